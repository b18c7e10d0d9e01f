//! `lazarus train --task anomaly` and anomaly sweeps through the CLI, on
//! generated features: class0 is normal, class1 is shifted away from it (or
//! drawn from the same cloud), class2 is left out where `--anomaly-label`
//! names only class1.

use crate::support;

use std::path::Path;

use support::{Synthetic, fails, json, lazarus, ok, stderr, synthetic_features};

const DIM: usize = 16;

fn setup(root: &Path, separation: f32) -> usize {
    synthetic_features(
        root,
        &Synthetic {
            name: "toy",
            counts: &[400, 150, 150],
            dim: DIM,
            separation,
        },
    )
}

fn anomaly(root: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--dataset",
        "toy",
        "--encoder",
        "toy-encoder",
        "--task",
        "anomaly",
    ];
    args.extend_from_slice(extra);
    lazarus(root, &args)
}

fn query(root: &Path, sql: &str) -> String {
    let db = rusqlite::Connection::open(root.join("experiments/experiments.db")).unwrap();
    db.query_row(sql, [], |row| row.get::<_, rusqlite::types::Value>(0))
        .map(|v| match v {
            rusqlite::types::Value::Text(t) => t,
            rusqlite::types::Value::Real(r) => r.to_string(),
            rusqlite::types::Value::Integer(i) => i.to_string(),
            other => format!("{other:?}"),
        })
        .unwrap()
}

#[test]
fn shifted_anomalies_score_near_one_with_every_scorer() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    // Class means 6 noise standard deviations from the origin, on different axes.
    setup(root, 6.0);
    let common = [
        "--normal-label",
        "class0",
        "--anomaly-label",
        "class1",
        "--json",
    ];
    let scorers: [&[&str]; 3] = [
        &["--scorer", "knn", "--k", "3"],
        &["--scorer", "knn", "--k", "1", "--coreset", "0.25"],
        &["--scorer", "mahalanobis"],
    ];
    for scorer in scorers {
        let mut args = scorer.to_vec();
        args.extend_from_slice(&common);
        let report = json(&ok(anomaly(root, &args)));
        let m = &report["metrics"];
        for key in ["val/roc_auc", "test/roc_auc", "test/pr_auc", "test/best_f1"] {
            let value = m[key].as_f64().unwrap();
            assert!(value > 0.98, "{key} {value} with {scorer:?}: {report:#}");
        }
        // class2 is neither normal nor named anomalous: left out, and counted.
        assert_eq!(m["test/anomalous"], 15.0, "{report:#}");
        assert_eq!(m["test/normal"], 40.0, "{report:#}");
        assert_eq!(m["test/excluded"], 15.0, "{report:#}");
        assert_eq!(m["train/normal"], 320.0, "{report:#}");
        assert!(m["test/best_f1_threshold"].as_f64().unwrap().is_finite());
        let run_dir = Path::new(report["run_dir"].as_str().unwrap());
        for file in [
            "scorer.safetensors",
            "scores.csv",
            "metrics.json",
            "config.json",
            "model_card.json",
            "plots/roc_curve.svg",
            "plots/roc_curve.png",
        ] {
            assert!(
                run_dir.join(file).is_file(),
                "{file} missing in {run_dir:?}"
            );
        }
        let scores = std::fs::read_to_string(run_dir.join("scores.csv")).unwrap();
        assert_eq!(
            scores.lines().count(),
            1 + 55 + 55,
            "header, val and test rows"
        );
        let tensors = lazarus::train::checkpoint::load_tensors(
            &run_dir.join("scorer.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(tensors["input_mean"].dims(), [DIM]);
        match scorer[1] {
            // The coreset keeps a quarter of the 320 normal training rows.
            "knn" if scorer.contains(&"--coreset") => {
                assert_eq!(tensors["memory_bank"].dims(), [80, DIM]);
                assert_eq!(report["memory_bank_rows"], 80);
            }
            "knn" => assert_eq!(tensors["memory_bank"].dims(), [320, DIM]),
            _ => {
                assert_eq!(tensors["whitening"].dims(), [DIM, DIM]);
                let shrinkage = m["train/shrinkage"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&shrinkage), "{shrinkage}");
            }
        }
        // Recorded like a classification run: tag, params, summary metrics.
        let id = report["run_id"].as_str().unwrap();
        let tag = query(
            root,
            &format!("SELECT value FROM tags WHERE run_id = '{id}' AND key = 'task'"),
        );
        assert_eq!(tag, "anomaly");
        let scorer_param = query(
            root,
            &format!("SELECT value_text FROM params WHERE run_id = '{id}' AND key = 'scorer'"),
        );
        assert_eq!(scorer_param, scorer[1]);
        let auc = query(
            root,
            &format!(
                "SELECT value FROM summary_metrics WHERE run_id = '{id}' AND key = 'test/roc_auc'"
            ),
        );
        assert_eq!(
            auc.parse::<f64>().unwrap(),
            m["test/roc_auc"].as_f64().unwrap()
        );
    }
    // A budget that leaves room for 7 bank rows per distance block scores
    // the same as one that holds the whole bank in one block.
    let args = ["--k", "3", "--normal-label", "class0", "--json"];
    let roomy = json(&ok(anomaly(root, &args)));
    assert_eq!(roomy["plan"]["bank_block"], 320, "{roomy:#}");
    let fixed = roomy["plan"]["fixed_bytes"].as_u64().unwrap();
    let per_row = roomy["plan"]["per_bank_row_bytes"].as_u64().unwrap();
    let budget = (fixed + 7 * per_row).to_string();
    let mut tight_args = args.to_vec();
    tight_args.extend(["--memory-budget", &budget]);
    let tight = json(&ok(anomaly(root, &tight_args)));
    assert_eq!(tight["plan"]["bank_block"], 7, "{tight:#}");
    assert_eq!(tight["metrics"], roomy["metrics"]);
    let too_small = (fixed + per_row - 1).to_string();
    tight_args.truncate(args.len());
    tight_args.extend(["--memory-budget", &too_small]);
    let message = fails(anomaly(root, &tight_args));
    assert!(
        message.contains("cannot hold a memory bank of 320 rows and one distance block"),
        "{message}"
    );
    // The same settings and seed give the same scores.
    let args = [
        "--scorer",
        "knn",
        "--coreset",
        "0.25",
        "--normal-label",
        "class0",
        "--json",
    ];
    let first = json(&ok(anomaly(root, &args)));
    let second = json(&ok(anomaly(root, &args)));
    assert_eq!(first["metrics"], second["metrics"]);
    // Without --anomaly-label every class that is not normal is anomalous.
    assert_eq!(first["metrics"]["test/anomalous"], 30.0);
    assert_eq!(first["metrics"]["test/excluded"], 0.0);
}

#[test]
fn one_cloud_for_normal_and_anomalous_scores_near_one_half() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    setup(root, 0.0);
    for scorer in ["knn", "mahalanobis"] {
        let report = json(&ok(anomaly(
            root,
            &["--scorer", scorer, "--normal-label", "class0", "--json"],
        )));
        for key in ["val/roc_auc", "test/roc_auc"] {
            let auc = report["metrics"][key].as_f64().unwrap();
            assert!((auc - 0.5).abs() < 0.15, "{scorer} {key} {auc}");
        }
    }
}

#[test]
fn bad_anomaly_input_is_refused_with_the_reason() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    setup(root, 6.0);
    let message = fails(anomaly(root, &["--normal-label", "class9"]));
    assert!(
        message.contains("normal label \"class9\" is not a class of dataset toy")
            && message.contains("class0, class1, class2"),
        "{message}"
    );
    let message = fails(anomaly(root, &[]));
    assert!(message.contains("at least one normal label"), "{message}");
    let message = fails(anomaly(root, &["--normal-label", "class0", "--k", "1000"]));
    assert!(
        message.contains("k = 1000 is larger than the memory bank (320 rows"),
        "{message}"
    );
    let message = fails(anomaly(
        root,
        &["--normal-label", "class0", "--k", "50", "--coreset", "20"],
    ));
    assert!(
        message.contains("k = 50 is larger than the memory bank (20 rows")
            && message.contains("coreset"),
        "{message}"
    );
    let message = fails(anomaly(
        root,
        &["--normal-label", "class0", "--coreset", "1.5"],
    ));
    assert!(
        message.contains("coreset fraction 1.5 must be in (0, 1]"),
        "{message}"
    );
    let message = fails(anomaly(root, &["--normal-label", "class0,class1,class2"]));
    assert!(message.contains("nothing is anomalous"), "{message}");
    let message = fails(anomaly(
        root,
        &["--normal-label", "class0", "--anomaly-label", "class0"],
    ));
    assert!(message.contains("both normal and anomalous"), "{message}");
    let message = fails(anomaly(
        root,
        &[
            "--normal-label",
            "class0",
            "--scorer",
            "mahalanobis",
            "--k",
            "3",
        ],
    ));
    assert!(
        message.contains("--k and --coreset apply to --scorer knn only"),
        "{message}"
    );
    let message = fails(anomaly(
        root,
        &["--normal-label", "class0", "--memory-budget", "1MiB"],
    ));
    assert!(
        message.contains("memory budget of 1048576 bytes cannot hold"),
        "{message}"
    );
    // Anomaly flags without --task anomaly are refused, not ignored.
    let message = fails(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "toy-encoder",
            "--normal-label",
            "class0",
        ],
    ));
    assert!(
        message.contains("--normal-label applies to --task anomaly only"),
        "{message}"
    );
    // An unknown scorer is a usage error (exit 2) that lists the known ones.
    let output = anomaly(root, &["--normal-label", "class0", "--scorer", "forest"]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("forest") && message.contains("knn") && message.contains("mahalanobis"),
        "{message}"
    );
    // Nothing was recorded as finished by the refused runs.
    let finished = query(root, "SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'");
    assert_eq!(finished, "0");
}

#[test]
fn anomaly_sweep_fits_every_scorer_once_and_skips_finished_ones() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    setup(root, 6.0);
    let file = root.join("anomaly.toml");
    std::fs::write(
        &file,
        r#"
name = "toy-anomaly"
dataset = "toy"
encoder = "toy-encoder"
task = "anomaly"
normal_label = "ok"
[label_map]
class0 = "ok"
class1 = "bad"
class2 = "bad"
[grid]
scorer = ["knn", "mahalanobis"]
k = [1, 3]
"#,
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let outcome = json(&ok(lazarus(root, &["sweep", file, "--json"])));
    // knn k=1, knn k=3, and one mahalanobis run (k does not apply to it).
    let runs = outcome["anomaly"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "{outcome:#}");
    for run in runs {
        assert_eq!(run["anomaly_classes"], serde_json::json!(["bad"]));
        assert!(
            run["metrics"]["test/roc_auc"].as_f64().unwrap() > 0.98,
            "{run:#}"
        );
    }
    for chart in outcome["charts"].as_array().unwrap() {
        assert!(Path::new(chart.as_str().unwrap()).is_file(), "{chart}");
    }
    let again = json(&ok(lazarus(root, &["sweep", file, "--json"])));
    assert!(again.get("anomaly").is_none(), "{again:#}");
    assert_eq!(again["skipped"].as_array().unwrap().len(), 3);
    let table = json(&ok(lazarus(
        root,
        &[
            "experiments",
            "ablate",
            "--by",
            "scorer",
            "--metric",
            "test/roc_auc",
            "--where",
            "sweep=toy-anomaly",
            "--json",
        ],
    )));
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{table:#}");
}

#[test]
fn a_sweep_counts_the_finished_runs_it_reuses_as_its_own() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    setup(root, 6.0);
    let sweep_file = |name: &str, ks: &str| {
        let file = root.join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"{name}\"\ndataset = \"toy\"\nencoder = \"toy-encoder\"\ntask = \"anomaly\"\n\
                 normal_label = \"ok\"\n[label_map]\nclass0 = \"ok\"\nclass1 = \"bad\"\nclass2 = \"bad\"\n\
                 [grid]\nk = [{ks}]\n"
            ),
        )
        .unwrap();
        file.to_str().unwrap().to_string()
    };
    let rows = |sweep: &str| {
        let table = json(&ok(lazarus(
            root,
            &[
                "experiments",
                "ablate",
                "--by",
                "k",
                "--metric",
                "test/roc_auc",
                "--where",
                &format!("sweep={sweep}"),
                "--json",
            ],
        )));
        let mut ks: Vec<u64> = table["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["levels"][0].as_f64().unwrap() as u64)
            .collect();
        ks.sort();
        ks
    };
    ok(lazarus(
        root,
        &["sweep", &sweep_file("first", "1"), "--json"],
    ));
    // k 1 is reused from `first`, k 3 fitted: both are `second`'s.
    let second = json(&ok(lazarus(
        root,
        &["sweep", &sweep_file("second", "1, 3"), "--json"],
    )));
    assert_eq!(second["skipped"].as_array().unwrap().len(), 1, "{second:#}");
    assert_eq!(second["anomaly"].as_array().unwrap().len(), 1, "{second:#}");
    assert_eq!(rows("second"), [1, 3]);
    assert_eq!(
        rows("first"),
        [1],
        "reuse does not move a run out of its own sweep"
    );
    // A sweep that trains nothing still compares what it reused.
    let third = json(&ok(lazarus(
        root,
        &["sweep", &sweep_file("third", "3"), "--json"],
    )));
    assert!(third.get("anomaly").is_none(), "{third:#}");
    assert_eq!(rows("third"), [3]);
    let charts = third["charts"].as_array().unwrap();
    assert!(!charts.is_empty(), "{third:#}");
    for chart in charts {
        assert!(Path::new(chart.as_str().unwrap()).is_file(), "{chart}");
    }
    // Grouped by sweep, a run counts under each sweep that holds it:
    // first {k 1}, second {k 1, k 3}, third {k 3}.
    let by_sweep = |more: &[&str]| {
        let mut args = vec![
            "experiments",
            "ablate",
            "--by",
            "sweep",
            "--metric",
            "test/roc_auc",
            "--json",
        ];
        args.extend_from_slice(more);
        let table = json(&ok(lazarus(root, &args)));
        table["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                (
                    row["levels"][0].as_str().unwrap().to_string(),
                    row["n"].as_u64().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let named = |pairs: &[(&str, u64)]| {
        pairs
            .iter()
            .map(|(sweep, n)| (sweep.to_string(), *n))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        by_sweep(&[]),
        named(&[("first", 1), ("second", 2), ("third", 1)])
    );
    assert_eq!(
        by_sweep(&["--where", "sweep=second"]),
        named(&[("second", 2)])
    );
    // Running it again adds nothing twice.
    ok(lazarus(
        root,
        &["sweep", &sweep_file("third", "3"), "--json"],
    ));
    assert_eq!(
        query(
            root,
            "SELECT COUNT(*) FROM sweep_runs WHERE sweep = 'third'"
        ),
        "1"
    );
}

#[test]
fn predict_on_an_anomaly_run_scores_cached_and_new_images_alike() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    support::extract_toy(root, &[20, 20]);
    let report = json(&ok(lazarus(
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
            "--k",
            "2",
            "--json",
        ],
    )));
    let run = report["run_id"].as_str().unwrap();
    let threshold = report["metrics"]["val/best_f1_threshold"].as_f64().unwrap();
    // A test image: its score must be the one the run recorded in scores.csv.
    let rows = support::image_rows(root, "toy");
    let test_row = rows.iter().find(|r| r[4] == "test").unwrap();
    let cached = Path::new(&test_row[2]).to_path_buf();
    let recorded: f64 =
        std::fs::read_to_string(Path::new(report["run_dir"].as_str().unwrap()).join("scores.csv"))
            .unwrap()
            .lines()
            .find(|line| line.starts_with(&format!("{},test,", test_row[0])))
            .and_then(|line| line.rsplit(',').next()?.parse().ok())
            .unwrap();
    // The same pixels as a BMP: a new content id, so the encoder runs.
    let pixels = image::open(&cached).unwrap().to_rgb8();
    let fresh = root.join("fresh.bmp");
    pixels
        .save_with_format(&fresh, image::ImageFormat::Bmp)
        .unwrap();
    let broken = root.join("broken.png");
    std::fs::write(&broken, b"not an image").unwrap();
    let output = lazarus(
        root,
        &[
            "predict",
            "--run",
            run,
            cached.to_str().unwrap(),
            fresh.to_str().unwrap(),
            broken.to_str().unwrap(),
            "--json",
            "--output",
            root.join("scores.csv").to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "one bad image");
    let scored = json(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(scored["threshold"].as_f64().unwrap(), threshold);
    let images = scored["images"].as_array().unwrap();
    assert_eq!(images[0]["features_from"], "cache");
    let score = images[0]["score"].as_f64().unwrap();
    assert!(
        (score - recorded).abs() < 1e-4 * recorded.max(1.0),
        "{score} vs {recorded}"
    );
    assert_eq!(images[0]["anomalous"], score >= threshold);
    // The encoder's f32 features against the cache's f16 rounding.
    assert_eq!(images[1]["features_from"], "encoder");
    let fresh_score = images[1]["score"].as_f64().unwrap();
    assert!(
        (fresh_score - score).abs() < 1e-2 * score.max(1.0),
        "cache {score} vs encoder {fresh_score}"
    );
    assert!(images[2]["error"].as_str().unwrap().contains("broken.png"));
    let csv = std::fs::read_to_string(root.join("scores.csv")).unwrap();
    assert!(
        csv.starts_with("path,image_id,features_from,score,anomalous,error"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 4, "{csv}");

    // Exported, the run predicts from its bundle as from the run, bit for
    // bit: the fresh file through the encoder, and (with --dataset) every
    // image of the dataset from the root's cache.
    let bundle = root.join("anomaly-bundle");
    let exported = json(&ok(lazarus(
        root,
        &["export", run, "--out", bundle.to_str().unwrap(), "--json"],
    )));
    assert_eq!(exported["task"], "anomaly");
    assert_eq!(
        support::manifest_files(&bundle),
        [
            "bundle.json",
            "config.json",
            "encoder.json",
            "metrics.json",
            "model_card.json",
            "scorer.safetensors",
        ]
    );
    let by_bundle = json(&ok(lazarus(
        root,
        &[
            "predict",
            "--bundle",
            bundle.to_str().unwrap(),
            "--task",
            "anomaly",
            fresh.to_str().unwrap(),
            "--json",
        ],
    )));
    assert_eq!(by_bundle["threshold"], scored["threshold"]);
    assert_eq!(by_bundle["run"], run);
    assert_eq!(by_bundle["images"][0], images[1], "{by_bundle:#}");
    let all = |source: &str, model: &str| {
        json(&ok(lazarus(
            root,
            &["predict", source, model, "--dataset", "toy", "--json"],
        )))
    };
    let from_run = all("--run", run);
    assert_eq!(all("--bundle", bundle.to_str().unwrap()), from_run);
    assert!(
        from_run["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["features_from"] == "cache")
    );
    // --task confirms what the bundle holds.
    let message = fails(lazarus(
        root,
        &[
            "predict",
            "--bundle",
            bundle.to_str().unwrap(),
            "--task",
            "classify",
            fresh.to_str().unwrap(),
        ],
    ));
    assert!(
        message.contains("--task classify") && message.contains("holds a anomaly model"),
        "{message}"
    );
    // A changed scorer is refused by name before it is read.
    let damaged = root.join("damaged-bundle");
    support::copy_dir(&bundle, &damaged);
    let mut scorer = std::fs::read(damaged.join("scorer.safetensors")).unwrap();
    let last = scorer.len() - 1;
    scorer[last] ^= 1;
    std::fs::write(damaged.join("scorer.safetensors"), scorer).unwrap();
    let message = fails(lazarus(
        root,
        &[
            "predict",
            "--bundle",
            damaged.to_str().unwrap(),
            fresh.to_str().unwrap(),
        ],
    ));
    assert!(
        message.contains("scorer.safetensors has sha256") && message.contains("manifest.json"),
        "{message}"
    );
}

/// A manifest dataset as anomaly benchmarks ship them: the train split holds
/// only normal ("good") images, val and test hold good and "bad" ones.
fn good_only_train_split(root: &Path) {
    use lazarus::features::{self, JobRef, ShardData};
    let dir = root.join("images");
    let mut manifest = String::from("path,label,split\n");
    let mut seed = 0;
    for (split, good, bad) in [("train", 60, 0), ("val", 10, 10), ("test", 10, 10)] {
        for (label, count) in [("good", good), ("bad", bad)] {
            for _ in 0..count {
                seed += 1;
                let name = format!("img{seed:03}.png");
                support::write_image(&dir.join(&name), seed, image::ImageFormat::Png);
                manifest.push_str(&format!("{name},{label},{split}\n"));
            }
        }
    }
    std::fs::write(dir.join("manifest.csv"), manifest).unwrap();
    ok(lazarus(
        root,
        &[
            "dataset",
            "add",
            "parts",
            dir.join("manifest.csv").to_str().unwrap(),
        ],
    ));
    let layout = lazarus::layout::Layout::new(root);
    let dataset = lazarus::dataset::load(&layout, "parts").unwrap();
    let (mut content_ids, mut pooled) = (Vec::new(), Vec::new());
    for record in &dataset.images {
        content_ids.push(support::file_sha256(&record.path));
        let shift = if record.label.as_deref() == Some("bad") {
            5.0
        } else {
            0.0
        };
        for d in 0..8 {
            let noise: f32 = (0..4)
                .map(|k| support::hash_unit((record.index * 100 + d * 4 + k) as u64))
                .sum::<f32>()
                - 2.0;
            let centre = if d == 0 { shift } else { 0.0 };
            pooled.push(half::f16::from_f32(centre + noise * 3f32.sqrt()));
        }
    }
    features::write_shard(
        &features::feature_dir(&layout, "fp1"),
        0,
        &ShardData {
            content_ids: &content_ids,
            pooled: &pooled,
            feature_dim: 8,
            spatial: None,
            views: None,
        },
        std::collections::HashMap::from([("encoder".to_string(), "toy-encoder".to_string())]),
        JobRef {
            job_id: 1,
            attempt: 1,
        },
    )
    .unwrap();
}

#[test]
fn a_train_split_of_normal_images_only_is_enough_and_a_normal_label_absent_from_it_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    good_only_train_split(root);
    let args = |normal: &'static str| {
        vec![
            "train",
            "--dataset",
            "parts",
            "--encoder",
            "toy-encoder",
            "--task",
            "anomaly",
            "--normal-label",
            normal,
            "--json",
        ]
    };
    let report = json(&ok(lazarus(root, &args("good"))));
    assert_eq!(report["metrics"]["train/normal"], 60.0);
    assert_eq!(report["metrics"]["test/anomalous"], 10.0);
    let auc = report["metrics"]["test/roc_auc"].as_f64().unwrap();
    assert!(auc > 0.95, "{auc}");
    let message = fails(lazarus(root, &args("bad")));
    assert!(
        message.contains("no training image of dataset parts has a normal label (bad); the train split has good: 60"),
        "{message}"
    );
    // A classifier still needs every class in every split.
    let message = fails(lazarus(
        root,
        &["train", "--dataset", "parts", "--encoder", "toy-encoder"],
    ));
    assert!(
        message.contains("label set differs between splits"),
        "{message}"
    );
}

#[test]
fn anomaly_and_classification_runs_refuse_other_weights_before_loading_them() {
    assert!(
        lazarus::weights::installed("efficientnet-lite0").is_some(),
        "efficientnet-lite0 weights are not installed: run scripts/fetch_assets.sh"
    );
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let tree = support::image_folder(root, &[12, 12]);
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    // Features of the installed (real) weights: the runs record their sha256.
    ok(lazarus(
        root,
        &[
            "enqueue",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
        ],
    ));
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&ok(lazarus(root, &args)))["run_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let scorer = train(&["--task", "anomaly", "--normal-label", "class0", "--k", "2"]);
    let classifier = train(&["--epochs", "2"]);
    // A new file (BMP: a new content id), so the encoder is needed.
    let pixels = image::open(tree.join("class0/img000.png"))
        .unwrap()
        .to_rgb8();
    let fresh = root.join("fresh.bmp");
    pixels
        .save_with_format(&fresh, image::ImageFormat::Bmp)
        .unwrap();
    // Other weights installed: loading them would fail on the file itself
    // (it is not a safetensors file); the sha256 check comes first and
    // names both sums.
    let (cache, installed) = support::other_weights_cache(temp.path());
    for run in [&scorer, &classifier] {
        let message = fails(support::lazarus_with_cache(
            root,
            &cache,
            &["predict", "--run", run.as_str(), fresh.to_str().unwrap()],
        ));
        assert!(
            message.contains(&format!("installed weights have sha256 {installed}, not ")),
            "run {run}: {message}"
        );
    }
    // Exported, both refuse the other weights from their bundles too,
    // before reading them.
    for run in [&scorer, &classifier] {
        let bundle = root.join(format!("bundle-{run}"));
        ok(lazarus(
            root,
            &["export", run.as_str(), "--out", bundle.to_str().unwrap()],
        ));
        let message = fails(support::lazarus_with_cache(
            root,
            &cache,
            &[
                "predict",
                "--bundle",
                bundle.to_str().unwrap(),
                fresh.to_str().unwrap(),
            ],
        ));
        assert!(
            message.contains(&format!("installed weights have sha256 {installed}, not ")),
            "bundle of run {run}: {message}"
        );
    }
}

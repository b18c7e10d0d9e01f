//! `lazarus experiments report` through the CLI: the report of a real
//! 24-run sweep (every run, the right best run per metric, valid HTML,
//! relative links to files that exist, the same ablation numbers as
//! `experiments ablate`), RUNNING runs and runs with missing files, anomaly
//! ROC/PR curves and segmentation Dice per image, empty selections, and the
//! rule that only an earlier report is ever replaced.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use image::{GrayImage, ImageFormat, Luma, Rgb, RgbImage};
use lazarus::experiments::{ExperimentsDb, ParamValue, RunStart};
use lazarus::layout::Layout;
use scraper::{ElementRef, Html, Selector};
use support::{Synthetic, fails, files_under, json, lazarus, ok, stderr, synthetic_features};

const SPEC: Synthetic = Synthetic {
    name: "toy",
    counts: &[150, 150],
    dim: 16,
    separation: 1.2,
};

fn write_sweep(root: &Path) -> String {
    let path = root.join("sweep.toml");
    std::fs::write(
        &path,
        r#"
name = "toy-heads"
dataset = "toy"
encoder = "toy-encoder"
epochs = 4
batch_size = 32
[grid]
head = ["linear", "mlp"]
lr = [0.001, 0.003, 0.01]
class_weights = ["none", "balanced"]
seed = [0, 1]
"#,
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn report(root: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["experiments", "report", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    lazarus(root, &args)
}

fn selector(text: &str) -> Selector {
    Selector::parse(text).unwrap()
}

/// Parses a page and fails on any HTML parse error.
fn page(path: &Path) -> Html {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let html = Html::parse_document(&text);
    assert!(
        html.errors.is_empty(),
        "{} is not valid HTML: {:?}",
        path.display(),
        html.errors
    );
    html
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Every page parses, and every link, image and style sheet is a relative
/// path to a file inside the report; no page loads anything from elsewhere.
fn check_pages_and_links(out: &Path) -> usize {
    let pages: Vec<PathBuf> = files_under(out)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "html"))
        .collect();
    let links = selector("a[href], img[src], link[href], script[src]");
    let mut checked = 0;
    for path in &pages {
        let html = page(path);
        for element in html.select(&links) {
            let value = element
                .value()
                .attr("href")
                .or_else(|| element.value().attr("src"))
                .unwrap();
            assert_ne!(
                element.value().name(),
                "script",
                "{} loads a script from {value}",
                path.display()
            );
            assert!(
                !value.contains("://") && !value.starts_with('/') && !value.starts_with("data:"),
                "{} links outside the report: {value}",
                path.display()
            );
            let (target, fragment) = value.split_once('#').unwrap_or((value, ""));
            if target.is_empty() {
                // A link within the page: the element it names exists.
                let id = selector(&format!("[id=\"{fragment}\"]"));
                assert!(
                    html.select(&id).next().is_some(),
                    "{} links #{fragment}, which it does not have",
                    path.display()
                );
                checked += 1;
                continue;
            }
            let file = path.parent().unwrap().join(percent_decode(target));
            assert!(
                file.is_file(),
                "{} links {value}, which does not exist ({})",
                path.display(),
                file.display()
            );
            checked += 1;
        }
    }
    checked
}

fn cell_texts(row: ElementRef<'_>) -> Vec<String> {
    row.select(&selector("td"))
        .map(|td| td.text().collect::<String>().trim().to_string())
        .collect()
}

#[test]
fn report_of_a_24_run_sweep_has_every_run_the_best_runs_and_valid_linked_html() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    synthetic_features(&root, &SPEC);
    let file = write_sweep(&root);
    let outcome = json(&ok(lazarus(&root, &["sweep", &file, "--json"])));
    assert_eq!(outcome["trained"].as_array().unwrap().len(), 24);

    // A run still going: this process holds its lock while the report is written.
    let db = ExperimentsDb::open(&Layout::new(&root)).unwrap();
    let live = db
        .start_run(RunStart {
            experiment: "live".into(),
            dataset: "toy".into(),
            encoder_fingerprint: "fp1".into(),
            config_hash: "live-run".into(),
            params: vec![
                ("head".into(), ParamValue::Text("mlp".into())),
                ("lr".into(), ParamValue::Number(0.05)),
            ],
            tags: vec![],
        })
        .unwrap();
    for epoch in 1..=3 {
        live.log_metrics(
            epoch,
            &[
                ("train/loss", 1.0 / epoch as f64),
                ("val/loss", 1.1 / epoch as f64),
            ],
        )
        .unwrap();
    }
    let runs = json(&ok(lazarus(&root, &["experiments", "list", "--json"])));
    let ids: Vec<String> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 25);
    // A finished run whose folder lost a plot: reported, the rest written.
    let damaged = ids[3].clone();
    let lost = root.join(format!(
        "experiments/runs/{damaged}/plots/confusion_matrix.svg"
    ));
    std::fs::remove_file(&lost).unwrap();

    let out = temp.path().join("site");
    let output = report(&root, &out, &[]);
    let printed = ok(output.clone());
    assert!(printed.contains("25 runs"), "{printed}");
    let warnings = stderr(&output);
    assert!(
        warnings.contains(&format!(
            "warning: run {damaged}: 1 recorded file is missing"
        )) && warnings.contains("plots/confusion_matrix.svg"),
        "{warnings}"
    );

    // The index: every run once, the running one as such.
    let index = page(&out.join("index.html"));
    let rows: Vec<ElementRef> = index
        .select(&selector("table#runs-table tbody tr"))
        .collect();
    let listed: BTreeSet<String> = rows
        .iter()
        .map(|r| r.value().attr("data-run").unwrap().to_string())
        .collect();
    assert_eq!(listed, ids.iter().cloned().collect::<BTreeSet<_>>());
    assert_eq!(rows.len(), 25);
    let live_row = rows
        .iter()
        .find(|r| r.value().attr("data-run") == Some(live.id()))
        .unwrap();
    assert_eq!(live_row.value().attr("data-status"), Some("RUNNING"));
    assert!(live_row.text().collect::<String>().contains("RUNNING"));

    // The best run per metric is the one `experiments best` names.
    let headers: Vec<String> = index
        .select(&selector("table#runs-table thead th"))
        .map(|th| th.value().attr("data-key").unwrap().to_string())
        .collect();
    for metric in [
        "test/accuracy",
        "test/loss",
        "val/accuracy",
        "test/macro_f1",
        "test/roc_auc/class1",
        "val/loss",
    ] {
        let column = headers
            .iter()
            .position(|h| h == metric)
            .unwrap_or_else(|| panic!("no column {metric} in {headers:?}"));
        let marked: Vec<&str> = rows
            .iter()
            .filter(|row| {
                row.select(&selector("td"))
                    .nth(column)
                    .unwrap()
                    .value()
                    .classes()
                    .any(|c| c == "best")
            })
            .map(|row| row.value().attr("data-run").unwrap())
            .collect();
        let best = json(&ok(lazarus(
            &root,
            &["experiments", "best", "--metric", metric, "--json"],
        )));
        assert_eq!(
            marked,
            vec![best["runs"][0]["run"].as_str().unwrap()],
            "best {metric}"
        );
    }
    // The warning names the damaged run; every param that varies is a column.
    let warning = index
        .select(&selector(".note.warn"))
        .map(|n| n.text().collect::<String>())
        .collect::<String>();
    assert!(warning.contains(&damaged), "{warning}");
    for param in ["head", "lr", "class_weights", "seed"] {
        assert!(headers.iter().any(|h| h == param), "{param} in {headers:?}");
    }

    // The sweep's page: the ablation numbers are `experiments ablate`'s.
    let experiment = page(&out.join("experiments/toy-heads.html"));
    for (by, metric) in [
        ("head", "test/accuracy"),
        ("lr", "test/loss"),
        ("class_weights", "val/accuracy"),
    ] {
        let wanted = format!("by {by} · {metric}");
        let heading = experiment
            .select(&selector("h3"))
            .find(|h| h.text().collect::<String>() == wanted)
            .unwrap_or_else(|| panic!("no table {wanted}"));
        let table = heading
            .next_siblings()
            .filter_map(ElementRef::wrap)
            .find(|e| e.value().name() == "table")
            .unwrap();
        let cli = json(&ok(lazarus(
            &root,
            &[
                "experiments",
                "ablate",
                "--by",
                by,
                "--metric",
                metric,
                "--where",
                "experiment=toy-heads",
                "--json",
            ],
        )));
        let cli_rows = cli["rows"].as_array().unwrap();
        let page_rows: Vec<ElementRef> = table.select(&selector("tbody tr")).collect();
        assert_eq!(page_rows.len(), cli_rows.len(), "{wanted}");
        for (row, expected) in page_rows.iter().zip(cli_rows) {
            let cells: Vec<ElementRef> = row.select(&selector("td")).collect();
            let mean: f64 = cells[2].value().attr("data-v").unwrap().parse().unwrap();
            assert_eq!(mean, expected["mean"].as_f64().unwrap(), "{wanted}");
            assert_eq!(
                cells[1].text().collect::<String>(),
                expected["n"].to_string(),
                "{wanted}"
            );
            let level = cells[0].text().collect::<String>();
            let cli_level = match &expected["levels"][0] {
                serde_json::Value::String(s) => s.clone(),
                number => number.to_string(),
            };
            assert_eq!(level, cli_level, "{wanted}");
        }
    }
    // Parallel coordinates: one line per finished run of the sweep.
    let lines = experiment
        .select(&selector(
            "div[data-group=pc][data-option=\"test/accuracy\"] svg path",
        ))
        .count();
    assert_eq!(lines, 24);

    // A run page: curves, confusion matrix with per-class scores, ROC and PR.
    let run_id = &ids[0];
    let run = page(&out.join(format!("runs/{run_id}/index.html")));
    let text = run.root_element().text().collect::<String>();
    for needle in [
        "Learning curves",
        "kept epoch",
        "Confusion matrix",
        "ROC (class1 positive)",
        "Precision-recall (class1 positive)",
        "test: AUC",
        "Model card",
        "model_card.json",
    ] {
        assert!(text.contains(needle), "{needle} missing from run page");
    }
    let matrix: Vec<Vec<String>> = run
        .select(&selector("table.confusion tbody tr"))
        .map(cell_texts)
        .collect();
    assert_eq!(matrix.len(), 2);
    let counted: u64 = matrix
        .iter()
        .flat_map(|row| row[..2].iter().map(|c| c.parse::<u64>().unwrap()))
        .sum();
    let detail = json(&ok(lazarus(
        &root,
        &["experiments", "show", run_id, "--json"],
    )));
    let recall = detail["summary"]["test/recall/class1"].as_f64().unwrap();
    assert_eq!(matrix[1][4], format!("{recall:.4}"));
    assert!(counted > 0 && matrix[0][2].parse::<u64>().unwrap() > 0);
    assert!(run.select(&selector("svg.chart path")).count() >= 4);

    // The damaged run says what is missing; the running one that it runs.
    let damaged_page =
        std::fs::read_to_string(out.join(format!("runs/{damaged}/index.html"))).unwrap();
    assert!(damaged_page.contains("recorded, missing from the folder"));
    let live_page =
        std::fs::read_to_string(out.join(format!("runs/{}/index.html", live.id()))).unwrap();
    assert!(
        live_page.contains("Still <strong>RUNNING</strong>"),
        "{live_page}"
    );
    assert!(
        live_page.contains("<svg"),
        "the running run's curves so far"
    );

    // The top runs compared side by side, curves overlaid.
    let compare = page(&out.join("compare/toy-heads-top.html"));
    let side_by_side = compare.select(&selector("table.data")).next().unwrap();
    let header: Vec<String> = side_by_side
        .select(&selector("thead th"))
        .map(|th| th.text().collect::<String>())
        .collect();
    assert_eq!(header.len(), 2 + 5, "{header:?}");
    // The same rows as `experiments compare` (per-class ones folded apart).
    let top: Vec<String> = side_by_side
        .select(&selector("thead th a"))
        .map(|a| a.text().collect::<String>())
        .collect();
    assert_eq!(top.len(), 5);
    let mut args = vec!["experiments", "compare"];
    args.extend(top.iter().map(String::as_str));
    args.push("--json");
    let cli = json(&ok(lazarus(&root, &args)));
    let rows = compare.select(&selector("table.data tbody tr")).count();
    assert_eq!(rows, cli["rows"].as_array().unwrap().len());
    assert!(compare.select(&selector("svg.chart")).count() >= 2);

    // Links, images and the style sheet are relative and exist.
    let linked = check_pages_and_links(&out);
    assert!(linked > 200, "{linked} links checked");
    let csv = std::fs::read_to_string(out.join("runs.csv")).unwrap();
    assert_eq!(csv.lines().count(), 26);

    // Explicit comparisons; an unknown run is refused before anything is written.
    let again = temp.path().join("site2");
    let pair = format!("{},{}", ids[0], ids[1]);
    ok(report(
        &root,
        &again,
        &["--experiment", "toy-heads", "--compare", &pair],
    ));
    page(&again.join(format!("compare/{}-{}.html", ids[0], ids[1])));
    let index = std::fs::read_to_string(again.join("index.html")).unwrap();
    assert!(index.contains("24 runs in 1 experiment"), "{index}");
    let message = fails(report(
        &root,
        &temp.path().join("site3"),
        &["--compare", "nope,other"],
    ));
    assert!(
        message.contains("run `nope` is not among the 25 runs"),
        "{message}"
    );
    assert!(!temp.path().join("site3").exists());
    drop(live);
}

/// Binary masks of one bright disc per image, 160x160.
fn write_blobs(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    for i in 0..n {
        let (cx, cy, r) = (
            50.0 + (i * 7 % 60) as f32,
            60.0 + (i * 11 % 40) as f32,
            22.0 + (i % 5) as f32 * 4.0,
        );
        let inside = |x: u32, y: u32| (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2) < r * r;
        let image = RgbImage::from_fn(160, 160, |x, y| {
            let noise = ((x * 31 + y * 17 + i as u32 * 13) % 40) as u8;
            if inside(x, y) {
                Rgb([200 + noise / 2, 180 + noise / 2, 60])
            } else {
                Rgb([30 + noise, 40 + noise, 50 + noise])
            }
        });
        image
            .save_with_format(dir.join(format!("images/{i:03}.png")), ImageFormat::Png)
            .unwrap();
        let mask = GrayImage::from_fn(160, 160, |x, y| Luma([if inside(x, y) { 255 } else { 0 }]));
        mask.save_with_format(dir.join(format!("masks/{i:03}.png")), ImageFormat::Png)
            .unwrap();
    }
}

#[test]
fn report_shows_anomaly_curves_and_segmentation_dice_per_image() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    synthetic_features(&root, &SPEC);
    let anomaly = json(&ok(lazarus(
        &root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "toy-encoder",
            "--task",
            "anomaly",
            "--normal-label",
            "class0",
            "--json",
        ],
    )));
    let anomaly_run = anomaly["run_id"].as_str().unwrap().to_string();

    let source = temp.path().join("blobs");
    write_blobs(&source, 16);
    ok(lazarus(
        &root,
        &["dataset", "add", "blobs", source.to_str().unwrap()],
    ));
    ok(lazarus(
        &root,
        &[
            "enqueue",
            "--dataset",
            "blobs",
            "--encoder",
            "efficientnet-lite0",
            "--spatial",
            "--weights",
            "random:0",
        ],
    ));
    ok(lazarus(&root, &["run-worker", "--until-empty"]));
    let segment = json(&ok(lazarus(
        &root,
        &[
            "train",
            "--task",
            "segment",
            "--dataset",
            "blobs",
            "--encoder",
            "efficientnet-lite0",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--json",
        ],
    )));
    let segment_run = segment["run_id"].as_str().unwrap().to_string();
    let dice_file = root.join(format!("experiments/runs/{segment_run}/test_dice.csv"));
    let dice_text = std::fs::read_to_string(&dice_file).unwrap();
    let test_images = segment["split_rows"]["test"].as_u64().unwrap();
    assert_eq!(
        dice_text.lines().count() as u64,
        1 + test_images,
        "{dice_text}"
    );

    let out = temp.path().join("site");
    ok(report(&root, &out, &[]));
    check_pages_and_links(&out);

    let run = page(&out.join(format!("runs/{anomaly_run}/index.html")));
    let text = run.root_element().text().collect::<String>();
    for needle in [
        "ROC (anomalous positive)",
        "val: AUC",
        "test: AUC",
        "test: AP",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from the anomaly run page"
        );
    }
    let curves: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join(format!("experiments/runs/{anomaly_run}/curves.json")))
            .unwrap(),
    )
    .unwrap();
    // The curve's area is the run's recorded test/roc_auc.
    assert_eq!(
        curves["splits"][1]["roc_auc"].as_f64().unwrap(),
        anomaly["metrics"]["test/roc_auc"].as_f64().unwrap()
    );

    let run = page(&out.join(format!("runs/{segment_run}/index.html")));
    let text = run.root_element().text().collect::<String>();
    assert!(text.contains("Dice per test image"), "no Dice section");
    let bars = run
        .select(&selector("svg.chart rect[fill=\"#3b82f6\"]"))
        .count() as u64;
    assert_eq!(bars, test_images);
    // Bars are labelled with the images' paths from the dataset.
    assert!(
        text.contains("Lowest Dice") && text.contains(".png"),
        "image paths"
    );
}

#[test]
fn empty_database_and_unmatched_filters_give_a_report_that_says_so() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let out = temp.path().join("site");
    ok(report(&root, &out, &[]));
    let index = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(index.contains("No runs recorded yet"), "{index}");
    assert!(
        !root.join("experiments").exists(),
        "reading creates no database"
    );
    page(&out.join("index.html"));

    let db = ExperimentsDb::open(&Layout::new(&root)).unwrap();
    let run = db
        .start_run(RunStart {
            experiment: "heads".into(),
            dataset: "toy".into(),
            encoder_fingerprint: "fp".into(),
            config_hash: "one".into(),
            params: vec![("head".into(), ParamValue::Text("linear".into()))],
            tags: vec![],
        })
        .unwrap();
    run.finish(
        lazarus::experiments::RunStatus::Finished,
        &[("test/accuracy", 0.75)],
    )
    .unwrap();
    for filter in [&["--experiment", "nope"][..], &["--where", "head=mlp"][..]] {
        ok(report(&root, &out, filter));
        let index = std::fs::read_to_string(out.join("index.html")).unwrap();
        assert!(index.contains("No run matches the selection"), "{index}");
        assert!(index.contains("experiments: heads"), "{index}");
        page(&out.join("index.html"));
    }
    let message = fails(report(&root, &out, &["--metric", "test/f2"]));
    assert!(
        message.contains("unknown metric `test/f2`; known metrics: test/accuracy"),
        "{message}"
    );
}

#[test]
fn an_existing_out_folder_is_replaced_whole_and_only_if_it_is_a_report() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();

    // A folder lazarus did not write is refused and left as it is.
    let theirs = temp.path().join("thesis");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("thesis.tex"), "\\documentclass{article}").unwrap();
    std::fs::write(theirs.join("index.html"), "<p>mine</p>").unwrap();
    let message = fails(report(&root, &theirs, &[]));
    assert!(
        message.contains("holds files lazarus experiments report did not write")
            && message.contains("thesis.tex")
            && message.contains("never replaced"),
        "{message}"
    );
    assert!(theirs.join("thesis.tex").is_file());
    assert_eq!(
        std::fs::read_to_string(theirs.join("index.html")).unwrap(),
        "<p>mine</p>"
    );
    // A file is no folder to replace.
    let file = temp.path().join("notes.txt");
    std::fs::write(&file, "keep").unwrap();
    let message = fails(report(&root, &file, &[]));
    assert!(message.contains("is not a folder"), "{message}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");

    // An earlier report is replaced as a whole, but never a file added to
    // it since: lazarus deletes only what it wrote.
    let out = temp.path().join("site");
    ok(report(&root, &out, &[]));
    std::fs::write(out.join("stray.txt"), "added later").unwrap();
    let message = fails(report(&root, &out, &[]));
    assert!(message.contains("stray.txt"), "{message}");
    assert_eq!(
        std::fs::read_to_string(out.join("stray.txt")).unwrap(),
        "added later"
    );
    std::fs::remove_file(out.join("stray.txt")).unwrap();
    ok(report(&root, &out, &[]));
    assert!(out.join("index.html").is_file() && out.join(".lazarus-output.json").is_file());
    // Nothing is left beside it (staging or the previous report).
    let beside: Vec<String> = std::fs::read_dir(temp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".tmp-"))
        .collect();
    assert!(beside.is_empty(), "{beside:?}");
}

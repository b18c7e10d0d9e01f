//! `dataset add` on the real elpv-dataset (fetched by scripts/fetch_assets.sh).

use crate::support;

use support::{assets, json, lazarus, ok};

#[test]
fn elpv_registers_2624_images_in_4_defect_classes() {
    let labels = assets::elpv_labels();
    let dir = tempfile::tempdir().unwrap();
    let out = ok(lazarus(
        dir.path(),
        &[
            "dataset",
            "add",
            "elpv",
            labels.to_str().unwrap(),
            "--label-column",
            "2",
        ],
    ));
    assert!(out.contains("2624 images (label-file)"), "{out}");

    let summary = json(&ok(lazarus(
        dir.path(),
        &["dataset", "show", "elpv", "--json"],
    )));
    assert_eq!(summary["images"], 2624);
    // Counts checked against `awk '{print $2}' labels.csv | sort | uniq -c`.
    assert_eq!(
        summary["classes"],
        serde_json::json!({"0.0": 1508, "0.3333333333333333": 295, "0.6666666666666666": 106, "1.0": 715})
    );
    assert_eq!(summary["duplicates"].as_array().unwrap().len(), 0);

    // Column 3 is the cell type.
    ok(lazarus(
        dir.path(),
        &[
            "dataset",
            "add",
            "elpv-type",
            labels.to_str().unwrap(),
            "--label-column",
            "3",
        ],
    ));
    let summary = json(&ok(lazarus(
        dir.path(),
        &["dataset", "show", "elpv-type", "--json"],
    )));
    assert_eq!(
        summary["classes"],
        serde_json::json!({"mono": 1074, "poly": 1550})
    );
}

//! Segmentation of real fluorescence nuclei (issue 22): the 16 tiles of 128 px
//! that scripts/fetch_data.sh cuts from the 2018 Data Science Bowl image in the
//! stardist wheel (scripts/gen_nuclei.py: 125 nuclei of 14-27 px; the manifest
//! fixes 10 train, 2 val and 4 test tiles), Lite0 with its real weights, the
//! fine maps. Reference figures on these tiles (scripts/bench_nuclei.sh,
//! BENCHMARKS.md): the Otsu threshold fitted on the training tiles gives test
//! Dice 0.777; `--maps 16,32` with the same head 0.68 ± 0.05; `--maps 4,8`
//! 0.916 ± 0.001 (seeds 1-3). Needs scripts/fetch_assets.sh once.

use crate::support::{self, assets};

use image::GrayImage;
use support::{json, lazarus, ok};

/// The masks at `paths` stacked into one tall mask (foreground > 0), so that
/// `dice` pools their pixels as lazarus's metric does.
fn stacked(paths: &[std::path::PathBuf]) -> GrayImage {
    let tiles: Vec<GrayImage> = paths
        .iter()
        .map(|path| image::open(path).unwrap().to_luma8())
        .collect();
    let width = tiles[0].width();
    let mut out = GrayImage::new(width, width * tiles.len() as u32);
    for (index, tile) in tiles.iter().enumerate() {
        assert_eq!(tile.dimensions(), (width, width));
        image::imageops::replace(&mut out, tile, 0, i64::from(width) * index as i64);
    }
    out
}

#[test]
fn real_nuclei_segment_at_dice_085_with_the_fine_maps() {
    assert!(
        lazarus::weights::installed("efficientnet-lite0").is_some(),
        "efficientnet-lite0 weights are not installed: run scripts/fetch_assets.sh"
    );
    let manifest = assets::nuclei_manifest();
    let source = manifest.parent().unwrap();
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");

    let added = json(&ok(lazarus(
        &root,
        &[
            "dataset",
            "add",
            "nuclei",
            manifest.to_str().unwrap(),
            "--json",
        ],
    )));
    assert_eq!(added["has_masks"], true, "{added}");
    assert_eq!(added["split_source"], "manifest", "{added}");
    assert_eq!(
        added["splits"],
        serde_json::json!({"train": 10, "val": 2, "test": 4})
    );

    ok(lazarus(
        &root,
        &[
            "enqueue",
            "--dataset",
            "nuclei",
            "--encoder",
            "efficientnet-lite0",
            "--spatial",
            "--maps",
            "4,8",
        ],
    ));
    ok(lazarus(&root, &["run-worker", "--until-empty"]));

    // configs/nuclei-segment.toml's settings, seed 1 (0.918 when measured).
    let report = json(&ok(lazarus(
        &root,
        &[
            "train",
            "--task",
            "segment",
            "--dataset",
            "nuclei",
            "--encoder",
            "efficientnet-lite0",
            "--maps",
            "4,8",
            "--head",
            "mlp",
            "--hidden",
            "32",
            "--epochs",
            "60",
            "--batch-size",
            "4",
            "--lr",
            "0.003",
            "--seed",
            "1",
            "--json",
        ],
    )));
    let test_dice = report["test"]["test/dice"].as_f64().unwrap();
    assert!(test_dice >= 0.85, "test/dice {test_dice}: {report}");

    // The masks `predict` writes for the test tiles, at their 128 px, score
    // the same against the fetched masks.
    let rows = std::fs::read_to_string(&manifest).unwrap();
    let test_stems: Vec<&str> = rows
        .lines()
        .filter(|line| line.split(',').nth(2) == Some("test"))
        .map(|line| line.split(',').next().unwrap())
        .map(|path| path.trim_start_matches("images/").trim_end_matches(".png"))
        .collect();
    assert_eq!(test_stems.len(), 4, "{rows}");
    let out = temp.path().join("masks");
    let run = report["run_id"].as_str().unwrap();
    let mut args = vec!["predict", "--run", run, "--out", out.to_str().unwrap()];
    let images: Vec<String> = test_stems
        .iter()
        .map(|stem| {
            source
                .join(format!("images/{stem}.png"))
                .display()
                .to_string()
        })
        .collect();
    args.extend(images.iter().map(String::as_str));
    ok(lazarus(&root, &args));
    let truth = stacked(
        &test_stems
            .iter()
            .map(|stem| source.join(format!("masks/{stem}.png")))
            .collect::<Vec<_>>(),
    );
    let predicted = stacked(
        &test_stems
            .iter()
            .map(|stem| out.join(format!("{stem}.mask.png")))
            .collect::<Vec<_>>(),
    );
    let predicted_dice = super::segment::dice(&truth, &predicted);
    assert!(
        predicted_dice >= 0.85,
        "Dice of the predicted test masks {predicted_dice} (the run's test/dice {test_dice})"
    );
}

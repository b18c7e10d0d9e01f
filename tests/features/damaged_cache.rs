//! Issue 19, item 3: no verb uses a damaged or incomplete cache without a
//! word. `train`, `sweep`, `predict`, `review` and `drift` check each shard
//! they map against its marker's sha256 and refuse a corrupt one by path,
//! with the repair command; a set that lacks images is refused with counts
//! per split unless `--allow-partial`, and a run allowed so records how many
//! images it lacked.

use crate::support;

use std::path::Path;

use support::{Synthetic, fails, json, lazarus, ok, synthetic_features};

const SPEC: Synthetic = Synthetic {
    name: "cells",
    counts: &[96, 96],
    dim: 8,
    separation: 2.0,
};

fn shard(root: &Path, index: u64) -> std::path::PathBuf {
    root.join("features/fp1")
        .join(format!("shard-{index:06}.safetensors"))
}

fn train(root: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--dataset",
        "cells",
        "--encoder",
        "toy-encoder",
        "--epochs",
        "1",
    ];
    args.extend_from_slice(extra);
    lazarus(root, &args)
}

fn write_sweep(root: &Path) -> String {
    let path = root.join("sweep.toml");
    std::fs::write(
        &path,
        "name = \"small\"\ndataset = \"cells\"\nencoder = \"toy-encoder\"\nepochs = 1\n[grid]\nhead = [\"linear\"]\nseed = [0, 1]\n",
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_corrupt_shard_is_refused_by_every_reader_by_path() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    assert_eq!(synthetic_features(root, &SPEC), 192);
    let run = json(&ok(train(root, &["--json"])));
    let run = run["run_id"].as_str().unwrap().to_string();
    let image = root.join("cells/tree/class0/img000.png");

    // One feature value flipped in place (the size stays; the checksum not).
    let damaged = shard(root, 1);
    let mut bytes = std::fs::read(&damaged).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    std::fs::write(&damaged, &bytes).unwrap();
    let sweep = write_sweep(root);
    let image_arg = image.to_str().unwrap();
    let verbs: Vec<Vec<&str>> = vec![
        vec![
            "train",
            "--dataset",
            "cells",
            "--encoder",
            "toy-encoder",
            "--epochs",
            "1",
        ],
        vec!["sweep", &sweep],
        vec!["predict", "--run", &run, image_arg],
        vec!["review", "--run", &run, "--dataset", "cells"],
        vec!["drift", "--reference", "cells", "--candidate", "cells"],
    ];
    for args in verbs {
        let error = fails(lazarus(root, &args));
        assert!(
            error.contains(damaged.to_str().unwrap())
                && error.contains("sha256")
                && error.contains("lazarus verify --repair"),
            "{args:?}: {error}"
        );
    }
}

#[test]
fn an_incomplete_set_is_refused_unless_allowed_and_then_recorded() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    assert_eq!(synthetic_features(root, &SPEC), 192);
    let run = json(&ok(train(root, &["--json"])));
    let run = run["run_id"].as_str().unwrap().to_string();
    // The middle shard's marker is gone: its 64 rows (the last of class0 and
    // the first of class1) are not published, and both classes remain.
    std::fs::remove_file(shard(root, 1).with_extension("done")).unwrap();

    let error = fails(train(root, &[]));
    assert!(
        error.contains("lack 64 of the 192 images of dataset cells")
            && error.contains("--allow-partial"),
        "{error}"
    );
    for args in [
        vec!["review", "--run", run.as_str(), "--dataset", "cells"],
        vec!["drift", "--reference", "cells", "--candidate", "cells"],
    ] {
        let error = fails(lazarus(root, &args));
        assert!(
            error.contains("lack 64 of the 192 images"),
            "{args:?}: {error}"
        );
        let mut allowed = args.clone();
        allowed.push("--allow-partial");
        ok(lazarus(root, &allowed));
    }
    let error = fails(lazarus(root, &["sweep", &write_sweep(root)]));
    assert!(error.contains("lack 64 of the 192 images"), "{error}");

    let report = json(&ok(train(root, &["--allow-partial", "--json"])));
    let run_dir = std::path::PathBuf::from(report["run_dir"].as_str().unwrap());
    let card = json(&std::fs::read_to_string(run_dir.join("model_card.json")).unwrap());
    assert_eq!(card["images_lacking"], 64, "{card}");
    let shown = json(&ok(lazarus(
        root,
        &[
            "experiments",
            "show",
            report["run_id"].as_str().unwrap(),
            "--json",
        ],
    )));
    assert_eq!(shown["params"]["images_lacking"], 64.0, "{shown}");
    assert_eq!(shown["params"]["dataset_version"], 1.0, "{shown}");
}

/// Finding a dataset's folder reads only headers and ids of the others: a
/// damaged folder of another configuration does not stop this reader.
#[test]
fn a_damaged_folder_of_another_configuration_does_not_stop_a_reader() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    synthetic_features(root, &SPEC);
    support::write_features_as(root, "cells", ("fp-other", "other-encoder"), 8, |_, d| {
        d as f32
    });
    let other = root.join("features/fp-other/shard-000000.safetensors");
    let mut bytes = std::fs::read(&other).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&other, &bytes).unwrap();
    ok(train(root, &[]));
    // Asked for the damaged configuration, the reader refuses it by path.
    let error = fails(lazarus(
        root,
        &["train", "--dataset", "cells", "--encoder", "other-encoder"],
    ));
    assert!(error.contains(other.to_str().unwrap()), "{error}");
}

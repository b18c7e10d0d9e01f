//! Partial fine-tuning as a library trainer (`train::finetune`, issue 22):
//! a spatial folder of stride-16 maps extracted through the CLI (`dataset
//! add`, `enqueue --spatial --maps 16`, `run-worker`) with the real Lite0
//! weights (scripts/fetch_assets.sh), then `finetune::fit` on it: the
//! blocks after block 10 move, the same seed gives the same run, and the
//! folders and blocks it cannot train from are refused by name.

use crate::support;

use std::path::Path;

use lazarus::encoders::{self, efficientnet_lite::EfficientNetLite};
use lazarus::features::catalog::FeatureKind;
use lazarus::layout::Layout;
use lazarus::train::blocks::TopBlocks;
use lazarus::train::config::HeadConfig;
use lazarus::train::data::{self, LoadConfig, TrainData};
use lazarus::train::finetune::{self, FinetuneConfig, FinetuneEncoder};
use support::{image_folder, json, lazarus, ok};

const ENCODER: &str = "efficientnet-lite0";

/// The installed Lite0 and its weights' sha256.
fn encoder() -> (EfficientNetLite, String) {
    let installed = lazarus::weights::installed(ENCODER).unwrap_or_else(|| {
        panic!(
            "{ENCODER} weights are not installed: run scripts/fetch_assets.sh first \
             (it installs them into $LAZARUS_CACHE, default ~/.cache/lazarus)"
        )
    });
    let model = encoders::load_lite_classifier(ENCODER, &installed.path, &candle_core::Device::Cpu)
        .unwrap();
    (model, installed.sha256)
}

/// Extracts the spatial maps `maps` of dataset `tree`; returns the folder's fingerprint.
fn extract(root: &Path, maps: &str) -> String {
    let enqueued = json(&ok(lazarus(
        root,
        &[
            "enqueue",
            "--dataset",
            "tree",
            "--encoder",
            ENCODER,
            "--spatial",
            "--maps",
            maps,
            "--json",
        ],
    )));
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    enqueued["fingerprint"].as_str().unwrap().to_string()
}

fn load(root: &Path, fingerprint: &str) -> TrainData {
    data::load(
        &Layout::new(root),
        "tree",
        Some(fingerprint),
        &LoadConfig {
            kind: Some(FeatureKind::Spatial),
            ..LoadConfig::default()
        },
    )
    .unwrap()
}

fn config(after_block: usize) -> FinetuneConfig {
    FinetuneConfig {
        after_block,
        head: HeadConfig::Linear,
        epochs: 2,
        batch_size: 8,
        learning_rate: 1e-3,
        weight_decay: 1e-4,
        blocks_learning_rate: 1e-4,
        blocks_weight_decay: 1e-4,
        warmup_steps: 2,
        seed: 3,
    }
}

#[test]
fn fine_tuning_trains_the_blocks_after_the_cached_map_and_refuses_other_folders() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    let tree = image_folder(temp.path(), &[20, 20]);
    ok(lazarus(
        &root,
        &["dataset", "add", "tree", tree.to_str().unwrap()],
    ));
    let fingerprint = extract(&root, "16");
    let data = load(&root, &fingerprint);
    let (model, sha256) = encoder();
    let encoder = FinetuneEncoder {
        model: &model,
        name: ENCODER,
        weights_sha256: &sha256,
    };

    let report = finetune::fit(&data, encoder, &config(10)).unwrap();
    assert_eq!(report.epochs.len(), 2);
    for epoch in &report.epochs {
        assert!(
            epoch.train_loss.is_finite() && epoch.train_loss > 0.0,
            "{epoch:?}"
        );
        assert!((0.0..=1.0).contains(&epoch.val_accuracy), "{epoch:?}");
    }
    assert!((0.0..=1.0).contains(&report.test_accuracy));
    assert!((0.0..=1.0).contains(&report.test_macro_f1));
    // The blocks moved away from the pretrained ones, every parameter of them.
    let pretrained = TopBlocks::from_encoder(&model, 10).unwrap();
    assert_eq!(report.blocks.after_block(), 10);
    for ((name, before), after) in pretrained
        .parameter_names()
        .iter()
        .zip(pretrained.parameters())
        .zip(report.blocks.parameters())
    {
        assert!(
            before.iter().zip(after).any(|(a, b)| a != b),
            "{name} did not change"
        );
    }
    // The same seed and data: the same run, bit for bit.
    let again = finetune::fit(&data, encoder, &config(10)).unwrap();
    assert_eq!(again.test_accuracy, report.test_accuracy);
    for (a, b) in again.epochs.iter().zip(&report.epochs) {
        assert_eq!(a.train_loss.to_bits(), b.train_loss.to_bits());
    }
    assert_eq!(again.blocks.parameters(), report.blocks.parameters());

    // Another K: refused, naming the folder, its maps and the K asked for.
    let error = finetune::fit(&data, encoder, &config(9))
        .unwrap_err()
        .to_string();
    let folder = data.features.dir().display().to_string();
    assert!(
        error.contains("--unfreeze-from 9")
            && error.contains(&folder)
            && error.contains("maps 16")
            && error.contains("K must be 10"),
        "{error}"
    );
    // A folder without the stride-16 map: refused, naming its maps.
    let coarse = load(&root, &extract(&root, "32"));
    let error = finetune::fit(&coarse, encoder, &config(10))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&coarse.features.dir().display().to_string())
            && error.contains("holds the maps 32")
            && error.contains("--maps 16"),
        "{error}"
    );
    // Maps of other weights: refused, naming the folder and both weights.
    let other = "0".repeat(64);
    let error = finetune::fit(
        &data,
        FinetuneEncoder {
            weights_sha256: &other,
            ..encoder
        },
        &config(10),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains(&folder)
            && error.contains(&format!("with weights sha256:{sha256}"))
            && error.contains(&format!("with weights sha256:{other}")),
        "{error}"
    );
}

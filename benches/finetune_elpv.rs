//! Benchmark: partial fine-tuning (issue 22) on a dataset's spatial folder,
//! through `train::finetune::fit`: the blocks after block 10 of Lite0 and a
//! head trained together from the cached stride-16 maps. Prints each
//! epoch (train loss, val accuracy and macro-F1, seconds) and the test
//! accuracy and macro-F1 of the best epoch by val accuracy.
//!
//! scripts/bench_elpv_finetune.sh prepares the root (elpv registered, its
//! `enqueue --spatial --maps 16` folder extracted) and runs it. Settings
//! come from the environment: `LAZARUS_ROOT` (required), `LAZARUS_DATASET`
//! (elpv), `LAZARUS_FINETUNE_HEAD` (`linear` or `mlp`: one hidden layer of
//! 256, ReLU), `_EPOCHS` (8), `_BATCH` (32), `_LR` (0.001), `_WEIGHT_DECAY`
//! (0.01), `_BLOCKS_LR` (0.0001), `_BLOCKS_WEIGHT_DECAY` (0.01), `_WARMUP`
//! (steps, 50), `_SEED` (0).

use std::time::Instant;

use lazarus::encoders;
use lazarus::features::catalog::FeatureKind;
use lazarus::layout::Layout;
use lazarus::train::config::{Activation, HeadConfig};
use lazarus::train::data::{self, LoadConfig};
use lazarus::train::finetune::{self, FinetuneConfig, FinetuneEncoder};

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    let key = format!("LAZARUS_FINETUNE_{name}");
    match std::env::var(&key) {
        Err(_) => default,
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{key}={text:?} does not parse")),
    }
}

fn main() {
    let root = std::env::var("LAZARUS_ROOT").expect("LAZARUS_ROOT names the root to read");
    let dataset = std::env::var("LAZARUS_DATASET").unwrap_or_else(|_| "elpv".to_string());
    let head = match setting("HEAD", "linear".to_string()).as_str() {
        "linear" => HeadConfig::Linear,
        "mlp" => HeadConfig::Mlp {
            hidden: vec![256],
            dropout: 0.0,
            activation: Activation::Relu,
        },
        other => panic!("LAZARUS_FINETUNE_HEAD={other:?}: linear or mlp"),
    };
    let config = FinetuneConfig {
        after_block: 10,
        head,
        epochs: setting("EPOCHS", 8),
        batch_size: setting("BATCH", 32),
        learning_rate: setting("LR", 1e-3),
        weight_decay: setting("WEIGHT_DECAY", 0.01),
        blocks_learning_rate: setting("BLOCKS_LR", 1e-4),
        blocks_weight_decay: setting("BLOCKS_WEIGHT_DECAY", 0.01),
        warmup_steps: setting("WARMUP", 50),
        seed: setting("SEED", 0),
    };
    println!("{config:?}");
    let started = Instant::now();
    let data = data::load(
        &Layout::new(&root),
        &dataset,
        None,
        &LoadConfig {
            kind: Some(FeatureKind::Spatial),
            encoder: Some("efficientnet-lite0".to_string()),
            ..LoadConfig::default()
        },
    )
    .expect("the dataset's spatial folder");
    println!(
        "{}: train {}, val {}, test {} images, classes {:?}",
        data.features.dir().display(),
        data.train.rows.len(),
        data.val.rows.len(),
        data.test.rows.len(),
        data.class_names
    );
    let installed =
        lazarus::weights::installed("efficientnet-lite0").expect("Lite0 weights installed");
    let model = encoders::load_lite_classifier(
        "efficientnet-lite0",
        &installed.path,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let encoder = FinetuneEncoder {
        model: &model,
        name: "efficientnet-lite0",
        weights_sha256: &installed.sha256,
    };
    let report = finetune::fit(&data, encoder, &config).unwrap();
    for epoch in &report.epochs {
        println!(
            "epoch {}: train loss {:.4}, val accuracy {:.4}, val macro-F1 {:.4}, {:.1} s",
            epoch.epoch + 1,
            epoch.train_loss,
            epoch.val_accuracy,
            epoch.val_macro_f1,
            epoch.seconds
        );
    }
    println!(
        "best epoch {}: test accuracy {:.4}, test macro-F1 {:.4}; {:.1} s in all ({} threads)",
        report.best_epoch + 1,
        report.test_accuracy,
        report.test_macro_f1,
        started.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    );
}

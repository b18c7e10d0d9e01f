//! Partial fine-tuning (`train --unfreeze-from K`, issue 22) on spatial
//! folders of stride-16 maps extracted through the CLI (`dataset add`,
//! `enqueue --spatial --maps 16`, `run-worker`) with the real Lite0 weights
//! (scripts/fetch_assets.sh): the library trainer (`finetune::fit`: the
//! blocks after block 10 move, the same seed gives the same run, the
//! folders and blocks it cannot train from are refused by name), and the
//! run through the CLI (recorded, predicted from cache and encoder,
//! exported as a bundle that predicts the same, resumed after kill -9 to
//! the same metrics, trained alike on every SIMD level).

use crate::support;

use std::path::Path;

use lazarus::encoders::{self, efficientnet_lite::EfficientNetLite};
use lazarus::features::catalog::FeatureKind;
use lazarus::layout::Layout;
use lazarus::train::blocks::TopBlocks;
use lazarus::train::config::{
    BlocksPooling, BlocksPrecision, BlocksPrecisionChoice, HeadConfig, MapMix, TrainConfig,
    Unfreeze,
};
use lazarus::train::data::{self, LoadConfig, TrainData};
use lazarus::train::finetune::{self, FineTunedBlocks, FinetuneEncoder};
use lazarus::train::schedule::Schedule;
use support::{fails, image_folder, image_folder_from, json, kill_after_checkpoint, lazarus, ok};

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

fn config(after_block: usize) -> TrainConfig {
    TrainConfig {
        head: HeadConfig::Linear,
        epochs: 2,
        batch_size: 8,
        learning_rate: 1e-3,
        weight_decay: 1e-4,
        schedule: Schedule::Cosine { warmup_steps: 2 },
        seed: 3,
        unfreeze: Some(Unfreeze {
            after_block,
            blocks_learning_rate: 1e-4,
            blocks_weight_decay: 1e-4,
            drop_path: 0.0,
            precision: BlocksPrecisionChoice::F32,
            pooling: BlocksPooling::Mean,
            mix: MapMix::None,
            ema: 0.0,
        }),
        ..TrainConfig::default()
    }
}

/// The blocks after `after_block` moved away from the pretrained ones, every
/// parameter of them, and the same seed and data repeat the run bit for bit.
fn assert_trained_and_repeatable(
    data: &TrainData,
    encoder: FinetuneEncoder,
    after_block: usize,
    report: &lazarus::train::run::RunReport,
    blocks: &FineTunedBlocks,
) {
    let pretrained = TopBlocks::from_encoder(encoder.model, after_block).unwrap();
    assert_eq!(blocks.blocks().after_block(), after_block);
    for ((name, before), after) in pretrained
        .parameter_names()
        .iter()
        .zip(pretrained.parameters())
        .zip(blocks.blocks().parameters())
    {
        assert!(
            before.iter().zip(after).any(|(a, b)| a != b),
            "{name} did not change"
        );
    }
    let (again, again_blocks) = finetune::fit(data, encoder, &config(after_block)).unwrap();
    assert_eq!(again.test, report.test);
    for (a, b) in again.epochs.iter().zip(&report.epochs) {
        assert_eq!(a["train/loss"].to_bits(), b["train/loss"].to_bits());
    }
    assert_eq!(
        again_blocks.blocks().parameters(),
        blocks.blocks().parameters()
    );
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

    let (report, blocks) = finetune::fit(&data, encoder, &config(10)).unwrap();
    assert_eq!(report.epochs.len(), 2);
    for epoch in &report.epochs {
        let loss = epoch["train/loss"];
        assert!(loss.is_finite() && loss > 0.0, "{epoch:?}");
        assert!((0.0..=1.0).contains(&epoch["val/accuracy"]), "{epoch:?}");
    }
    assert!((0.0..=1.0).contains(&report.test["test/accuracy"]));
    assert!((0.0..=1.0).contains(&report.test["test/macro_f1"]));
    assert_trained_and_repeatable(&data, encoder, 10, &report, &blocks);

    // Another K: refused, naming the folder, its maps and the K asked for.
    let error = finetune::fit(&data, encoder, &config(9))
        .unwrap_err()
        .to_string();
    let folder = data.features.dir().display().to_string();
    assert!(
        error.contains("--unfreeze-from 9")
            && error.contains(&folder)
            && error.contains("maps 16")
            && error.contains(
                "K must be 2 (the stride-4 map), 4 (the stride-8 map), 10 (the stride-16 map)"
            ),
        "{error}"
    );
    // The K of another cached map, on a folder without that map: refused,
    // naming the map to extract.
    let error = finetune::fit(&data, encoder, &config(4))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("not the stride-8 map (block 4's output)")
            && error.contains("--cache-at 4 (the same as --spatial --maps 8)"),
        "{error}"
    );
    // From the stride-8 map (block 4's output): blocks 5.. train, every
    // parameter of them, and the same seed repeats the run bit for bit.
    let fine = load(&root, &extract(&root, "8"));
    assert_eq!(model.map_block_index(8).unwrap(), 4);
    let (report, blocks) = finetune::fit(&fine, encoder, &config(4)).unwrap();
    assert_eq!(report.epochs.len(), 2);
    assert!((0.0..=1.0).contains(&report.test["test/accuracy"]));
    assert_eq!(blocks.info().stride, 8);
    assert_trained_and_repeatable(&fine, encoder, 4, &report, &blocks);
    // A folder without the stride-16 map: refused, naming its maps.
    let coarse = load(&root, &extract(&root, "32"));
    let error = finetune::fit(&coarse, encoder, &config(10))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&coarse.features.dir().display().to_string())
            && error.contains("holds the maps 32")
            && error.contains("--cache-at 10"),
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

/// Extracts the stride-16 maps of a new root's dataset `tree` of `counts`
/// images per class; returns the root.
fn fine_tuning_root(dir: &Path, counts: &[usize]) -> std::path::PathBuf {
    let root = dir.join("root");
    let tree = image_folder(dir, counts);
    ok(lazarus(
        &root,
        &["dataset", "add", "tree", tree.to_str().unwrap()],
    ));
    extract(&root, "16");
    root
}

const TRAIN: [&str; 6] = ["train", "--dataset", "tree", "--encoder", ENCODER, "--json"];

/// `predict` of a dataset image (`cached`) and of a new one by fine-tuned
/// run `run`, then by the bundle it exports to `bundle`: (by run, by bundle,
/// the two image paths). The run reads the first from the cache and encodes
/// the second; the bundle (no cache) encodes both.
fn answers_of_run_and_bundle(
    root: &Path,
    run: &str,
    cached: &Path,
    bundle: &Path,
) -> (serde_json::Value, serde_json::Value, Vec<String>) {
    let fresh_tree = image_folder_from(&bundle.with_extension("fresh"), &[1, 1], 500);
    let fresh = fresh_tree.join("class0/img000.png");
    let images: Vec<String> = [cached, fresh.as_path()]
        .iter()
        .map(|path| path.to_str().unwrap().to_string())
        .collect();
    let predict = |by: [&str; 2]| {
        let mut args = vec!["predict", by[0], by[1]];
        args.extend(images.iter().map(String::as_str));
        args.push("--json");
        json(&ok(lazarus(root, &args)))
    };
    let by_run = predict(["--run", run]);
    assert_eq!(by_run[0]["features_from"], "cache");
    assert_eq!(by_run[1]["features_from"], "encoder");
    ok(lazarus(
        root,
        &["export", run, "--out", bundle.to_str().unwrap()],
    ));
    let by_bundle = predict(["--bundle", bundle.to_str().unwrap()]);
    (by_run, by_bundle, images)
}

#[test]
fn a_fine_tuned_run_records_its_blocks_and_predicts_the_same_from_run_and_bundle() {
    let temp = tempfile::tempdir().unwrap();
    let root = fine_tuning_root(temp.path(), &[10, 10]);
    let train = |more: &[&str]| {
        let mut args = TRAIN.to_vec();
        args.extend_from_slice(more);
        lazarus(&root, &args)
    };
    // Settings a fine-tuned run cannot take are refused before any training.
    let refused = fails(train(&["--unfreeze-from", "9"]));
    assert!(refused.contains("K must be 2"), "{refused}");
    let refused = fails(train(&["--blocks-lr", "1e-4"]));
    assert!(
        refused.contains("--blocks-lr applies to --unfreeze-from K"),
        "{refused}"
    );
    let refused = fails(train(&["--unfreeze-from", "10", "--precision", "f16"]));
    assert!(refused.contains("trains the head in f32"), "{refused}");
    let refused = fails(train(&["--unfreeze-from", "10", "--layers", "all"]));
    assert!(refused.contains("read spatial ones"), "{refused}");

    let report = json(&ok(train(&[
        "--unfreeze-from",
        "10",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--blocks-lr",
        "3e-4",
        "--seed",
        "5",
    ])));
    let run = report["run_id"].as_str().unwrap().to_string();
    assert_eq!(report["epochs_run"], 3);
    let run_dir = root.join("experiments/runs").join(&run);
    // The run's blocks file holds blocks 11.. and the head convolution,
    // trained away from the installed encoder's.
    let blocks = FineTunedBlocks::read(&run_dir.join("blocks.safetensors")).unwrap();
    let (model, sha256) = encoder();
    assert_eq!(blocks.info().weights, format!("sha256:{sha256}"));
    let pretrained = TopBlocks::from_encoder(&model, 10).unwrap();
    assert_eq!(
        blocks.blocks().parameter_names(),
        pretrained.parameter_names()
    );
    assert_ne!(blocks.blocks().parameters(), pretrained.parameters());
    let card = json(&std::fs::read_to_string(run_dir.join("model_card.json")).unwrap());
    assert!(
        card["fine_tuned_blocks"]
            .as_str()
            .unwrap()
            .contains("after block 10"),
        "{card:#}"
    );
    assert_eq!(card["config"]["unfreeze"]["after_block"], 10);
    assert_eq!(card["config"]["unfreeze"]["blocks_learning_rate"], 3e-4);
    let shown = json(&ok(lazarus(
        &root,
        &["experiments", "show", &run, "--json"],
    )));
    assert_eq!(
        shown["params"]["trained_blocks"], "11-15,head_conv",
        "{shown:#}"
    );
    let cached = root.parent().unwrap().join("tree/class1/img003.png");
    let bundle = temp.path().join("bundle");
    let (by_run, by_bundle, images) = answers_of_run_and_bundle(&root, &run, &cached, &bundle);
    let info = json(&std::fs::read_to_string(bundle.join("bundle.json")).unwrap());
    assert_eq!(info["format_version"], 2);
    assert_eq!(
        info["trained_blocks"]["changed"],
        serde_json::json!([
            "block11",
            "block12",
            "block13",
            "block14",
            "block15",
            "head_conv"
        ])
    );
    // The same image through the encoder: the same bits. Its cached map was
    // stored from the same encoder pass, so cache and encoder agree too.
    assert_eq!(by_bundle[1]["top"], by_run[1]["top"]);
    assert_eq!(by_bundle[0]["top"], by_run[0]["top"]);
    // A damaged blocks file is refused by the bundle's manifest.
    let mut args = vec!["predict", "--bundle", bundle.to_str().unwrap()];
    args.extend(images.iter().map(String::as_str));
    args.push("--json");
    let blocks_file = bundle.join("blocks.safetensors");
    let mut bytes = std::fs::read(&blocks_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&blocks_file, bytes).unwrap();
    let refused = fails(lazarus(&root, &args));
    assert!(refused.contains("blocks.safetensors"), "{refused}");
}

#[test]
fn a_run_fine_tuned_from_the_stride_8_map_predicts_the_same_from_run_and_bundle() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    let tree = image_folder(temp.path(), &[8, 8]);
    ok(lazarus(
        &root,
        &["dataset", "add", "tree", tree.to_str().unwrap()],
    ));
    // `--cache-at 4`: block 4's output, the stride-8 map.
    ok(lazarus(
        &root,
        &[
            "enqueue",
            "--dataset",
            "tree",
            "--encoder",
            ENCODER,
            "--cache-at",
            "4",
        ],
    ));
    ok(lazarus(&root, &["run-worker", "--until-empty"]));
    let mut args = TRAIN.to_vec();
    args.extend_from_slice(&[
        "--unfreeze-from",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--seed",
        "5",
    ]);
    let report = json(&ok(lazarus(&root, &args)));
    let run = report["run_id"].as_str().unwrap().to_string();
    let shown = json(&ok(lazarus(
        &root,
        &["experiments", "show", &run, "--json"],
    )));
    assert_eq!(
        shown["params"]["trained_blocks"], "5-15,head_conv",
        "{shown:#}"
    );
    let bundle = temp.path().join("bundle");
    let (by_run, by_bundle, _) =
        answers_of_run_and_bundle(&root, &run, &tree.join("class1/img003.png"), &bundle);
    let info = json(&std::fs::read_to_string(bundle.join("bundle.json")).unwrap());
    let changed = info["trained_blocks"]["changed"].as_array().unwrap();
    assert_eq!(
        changed.len(),
        12,
        "blocks 5..=15 and the head convolution: {info:#}"
    );
    assert_eq!(changed[0], "block5");
    assert_eq!(by_bundle[0]["top"], by_run[0]["top"]);
    assert_eq!(by_bundle[1]["top"], by_run[1]["top"]);
}

#[test]
fn a_run_fine_tuned_at_another_input_size_reads_and_encodes_tiles_at_that_size() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("root");
    let tree = image_folder(temp.path(), &[8, 8]);
    ok(lazarus(
        &root,
        &["dataset", "add", "tree", tree.to_str().unwrap()],
    ));
    let enqueue = |extra: &[&str]| {
        let mut args = vec![
            "enqueue",
            "--dataset",
            "tree",
            "--encoder",
            ENCODER,
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&ok(lazarus(&root, &args)))["fingerprint"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let registered = enqueue(&["--cache-at", "4"]);
    let small = enqueue(&["--cache-at", "4", "--image-size", "160"]);
    // The registry's own square is no choice: the same folder.
    assert_eq!(
        enqueue(&["--cache-at", "4", "--image-size", "224"]),
        registered
    );
    assert_ne!(small, registered);
    let refused = fails(lazarus(
        &root,
        &[
            "enqueue",
            "--dataset",
            "tree",
            "--encoder",
            ENCODER,
            "--cache-at",
            "4",
            "--resize",
            "crop",
        ],
    ));
    assert!(refused.contains("--resize"), "{refused}");
    ok(lazarus(&root, &["run-worker", "--until-empty"]));
    // 160 px tiles: the stride-8 map is 20 x 20 (28 x 28 at 224).
    let side = |fingerprint: &str| {
        let data = load(&root, fingerprint);
        let maps = data.features.maps();
        let map = maps.iter().find(|map| map.stride == 8).unwrap();
        (map.height, map.width)
    };
    assert_eq!(side(&small), (20, 20));
    assert_eq!(side(&registered), (28, 28));

    // Two stride-8 folders: the run names its input square.
    let mut args = TRAIN.to_vec();
    args.extend_from_slice(&[
        "--unfreeze-from",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--seed",
        "5",
    ]);
    let asked = fails(lazarus(&root, &args));
    assert!(asked.contains("--image-size"), "{asked}");
    args.extend_from_slice(&["--image-size", "160"]);
    let report = json(&ok(lazarus(&root, &args)));
    let run = report["run_id"].as_str().unwrap().to_string();
    let shown = json(&ok(lazarus(
        &root,
        &["experiments", "show", &run, "--json"],
    )));
    assert_eq!(
        shown["run"]["encoder_fingerprint"],
        small.as_str(),
        "{shown:#}"
    );

    // A copy of a cached image (other bytes, same pixels) goes through the
    // encoder at 160 px and gets the cached image's answer (an encoder at
    // 224 would give the blocks a 28 x 28 map and another answer).
    let cached = tree.join("class1/img003.png");
    let copy = temp.path().join("copy.png");
    support::reencoded_png(&cached, &copy);
    let answers = json(&ok(lazarus(
        &root,
        &[
            "predict",
            "--run",
            &run,
            cached.to_str().unwrap(),
            copy.to_str().unwrap(),
            "--json",
        ],
    )));
    assert_eq!(answers[0]["features_from"], "cache");
    assert_eq!(answers[1]["features_from"], "encoder");
    assert_eq!(answers[0]["top"][0][0], answers[1]["top"][0][0]);
    let probability = |answer: &serde_json::Value| answer["top"][0][1].as_f64().unwrap();
    let difference = (probability(&answers[0]) - probability(&answers[1])).abs();
    assert!(difference < 1e-2, "cache vs encoder: {difference}");
    // The bundle encodes at 160 px too.
    let bundle = temp.path().join("bundle");
    let (by_run, by_bundle, _) = answers_of_run_and_bundle(&root, &run, &cached, &bundle);
    assert_eq!(by_bundle[0]["top"][0][0], by_run[0]["top"][0][0]);
    let difference = (probability(&by_bundle[0]) - probability(&by_run[0])).abs();
    assert!(difference < 1e-2, "run vs bundle: {difference}");
    assert_eq!(by_bundle[1]["top"], by_run[1]["top"]);
}

/// The blocks file of run `run` under `root`.
fn run_blocks(root: &Path, run: &str) -> FineTunedBlocks {
    FineTunedBlocks::read(
        &root
            .join("experiments/runs")
            .join(run)
            .join("blocks.safetensors"),
    )
    .unwrap()
}

#[test]
fn a_run_fine_tuned_on_flipped_maps_averages_its_answers_over_the_flips() {
    let temp = tempfile::tempdir().unwrap();
    let root = fine_tuning_root(temp.path(), &[8, 8]);
    let fine_tune = |eval_views: &str| {
        let mut args = one_epoch_from_block_10("3");
        args.extend_from_slice(&["--augment-maps", "flips", "--eval-views", eval_views]);
        json(&ok(lazarus(&root, &args)))["run_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // One epoch, so both runs keep the same (only) epoch's blocks and head:
    // they differ only in how they read a map.
    let averaged = fine_tune("mean");
    let as_cached = fine_tune("first");
    let (averaged_blocks, cached_blocks) =
        (run_blocks(&root, &averaged), run_blocks(&root, &as_cached));
    assert_eq!(averaged_blocks.info().views.name(), "flips");
    assert_eq!(cached_blocks.info().views.name(), "1");
    assert_eq!(
        averaged_blocks.blocks().parameters(),
        cached_blocks.blocks().parameters()
    );
    for (run, expected) in [(&averaged, "mean"), (&as_cached, "first")] {
        let shown = json(&ok(lazarus(&root, &["experiments", "show", run, "--json"])));
        assert_eq!(shown["params"]["eval_views"], expected, "{shown:#}");
    }

    // Run and bundle give the same averaged answer, from the cache and
    // from the encoder; it is not the map-as-cached answer.
    let cached = root.parent().unwrap().join("tree/class1/img003.png");
    let bundle = temp.path().join("bundle");
    let (by_run, by_bundle, _) = answers_of_run_and_bundle(&root, &averaged, &cached, &bundle);
    assert_eq!(by_bundle[0]["top"], by_run[0]["top"]);
    assert_eq!(by_bundle[1]["top"], by_run[1]["top"]);
    let (first_by_run, _, _) =
        answers_of_run_and_bundle(&root, &as_cached, &cached, &temp.path().join("first"));
    for image in 0..2 {
        assert_ne!(
            by_run[image]["top"], first_by_run[image]["top"],
            "image {image}"
        );
    }
}

/// `train` of the blocks after block 10 for one epoch in batches of 8.
fn one_epoch_from_block_10(seed: &str) -> Vec<&str> {
    let mut args = TRAIN.to_vec();
    args.extend_from_slice(&[
        "--unfreeze-from",
        "10",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--seed",
        seed,
    ]);
    args
}

/// One epoch with `extra` twice and one without: the same blocks twice,
/// other blocks than without. Returns the run with `extra`, its blocks'
/// parameters and its params.
fn repeated_and_changed_by(
    root: &Path,
    extra: &[&str],
    plain: &str,
) -> (String, Vec<f32>, serde_json::Value) {
    let run = run_of(one_epoch_with(root, extra));
    let again = run_of(one_epoch_with(root, extra));
    let blocks = run_blocks(root, &run).blocks().parameters().concat();
    assert_eq!(
        blocks,
        run_blocks(root, &again).blocks().parameters().concat(),
        "{extra:?}"
    );
    assert_ne!(
        blocks,
        run_blocks(root, plain).blocks().parameters().concat(),
        "{extra:?}"
    );
    let shown = json(&ok(lazarus(root, &["experiments", "show", &run, "--json"])));
    (run, blocks, shown["params"].clone())
}

/// A blocks-only flag on a run without `--unfreeze-from` is refused by name.
fn refused_without_blocks(root: &Path, flag: &str, value: &str) {
    let mut frozen = TRAIN.to_vec();
    frozen.extend_from_slice(&[flag, value]);
    let refused = fails(lazarus(root, &frozen));
    assert!(
        refused.contains(&format!("{flag} applies to --unfreeze-from K")),
        "{refused}"
    );
}

/// One epoch from block 10 at seed 3 with `extra` flags.
fn one_epoch_with(root: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = one_epoch_from_block_10("3");
    args.extend_from_slice(extra);
    lazarus(root, &args)
}

/// The run id of a successful `train --json`.
fn run_of(output: std::process::Output) -> String {
    json(&ok(output))["run_id"].as_str().unwrap().to_string()
}

/// The fine-tuning loops run at the widest SIMD level the CPU has; each
/// narrower one (forced with `LAZARUS_SIMD`, read once per process) trains
/// the same blocks. AVX2 bit for bit (its loops are element-wise and its
/// matrix products fuse multiply-adds in the same order as AVX-512's); the
/// scalar products do not fuse them, so there the first epoch's training
/// loss agrees to 1e-6 (4e-8 measured; the blocks' AdamW steps amplify rounding where a
/// gradient is near zero: parameters differ by up to 1.6e-4 after 2 steps).
#[test]
fn fine_tuning_trains_the_same_blocks_on_every_simd_level() {
    let temp = tempfile::tempdir().unwrap();
    let root = fine_tuning_root(temp.path(), &[8, 8]);
    let args = one_epoch_from_block_10("5");
    let trained = |output| {
        let report = json(&ok(output));
        let run = report["run_id"].as_str().unwrap().to_string();
        let loss = report["epochs"][0]["train/loss"].as_f64().unwrap();
        (run_blocks(&root, &run).into_blocks(), loss)
    };
    let (widest, widest_loss) = trained(lazarus(&root, &args));
    let detected = encoders::SimdLevel::detected();
    let mut compared = Vec::new();
    for level in encoders::SimdLevel::available() {
        if level == detected {
            continue;
        }
        let (blocks, loss) = trained(
            support::queue_command(&root, None)
                .env(encoders::SIMD_ENV, level.name())
                .args(&args)
                .output()
                .unwrap(),
        );
        if level == encoders::SimdLevel::Scalar {
            assert!(
                (loss - widest_loss).abs() <= 1e-6 * widest_loss.abs(),
                "{level}: training loss {loss}, {detected}: {widest_loss}"
            );
        } else {
            assert!(
                blocks.parameters() == widest.parameters(),
                "{level}: other blocks than at {detected}"
            );
        }
        compared.push(level);
    }
    // Every x86-64 machine this runs on has a narrower level than its widest.
    assert!(
        !compared.is_empty() || detected == encoders::SimdLevel::Scalar,
        "no narrower level than {detected}"
    );
}

/// `--blocks-precision bf16`: the blocks' matrix products take bf16
/// operands with f32 sums (natively with AVX-512 BF16, else through the f32
/// products on rounded operands). The run records it, its blocks file
/// makes every answer repeat it (run and bundle agree), and it trains other
/// blocks than f32 with nearly the same first-epoch loss: 2 steps of a
/// random-weight encoder's blocks (a loss near 10.7), where bf16's 8-bit
/// mantissa moves the loss by 1.3e-3 of itself (reference: the f32 run of
/// the same seed).
#[test]
fn bf16_blocks_are_recorded_repeated_by_every_answer_and_train_near_f32() {
    let temp = tempfile::tempdir().unwrap();
    let root = fine_tuning_root(temp.path(), &[8, 8]);
    let trained = |extra: &[&str], simd: Option<&str>| {
        let mut args = one_epoch_from_block_10("5");
        args.extend_from_slice(extra);
        let mut command = support::queue_command(&root, None);
        if let Some(level) = simd {
            command.env(encoders::SIMD_ENV, level);
        }
        let report = json(&ok(command.args(&args).output().unwrap()));
        let run = report["run_id"].as_str().unwrap().to_string();
        let loss = report["epochs"][0]["train/loss"].as_f64().unwrap();
        (run, loss)
    };
    let (f32_run, f32_loss) = trained(&[], None);
    let (bf16_run, bf16_loss) = trained(&["--blocks-precision", "bf16"], None);
    let (f32_blocks, bf16_blocks) = (run_blocks(&root, &f32_run), run_blocks(&root, &bf16_run));
    assert_eq!(f32_blocks.blocks().precision(), BlocksPrecision::F32);
    assert_eq!(bf16_blocks.blocks().precision(), BlocksPrecision::Bf16);
    assert_eq!(bf16_blocks.info().precision, BlocksPrecision::Bf16);
    assert_ne!(
        f32_blocks.blocks().parameters(),
        bf16_blocks.blocks().parameters()
    );
    assert!(
        (bf16_loss - f32_loss).abs() <= 5e-3 * f32_loss.abs(),
        "bf16 loss {bf16_loss}, f32 {f32_loss}"
    );
    // Below AVX-512 the products round the same operands and sum them in
    // another order (and keep what `vdpbf16ps` flushes to zero): the loss
    // moves by 1.6e-4 of itself, an eighth of bf16's distance from f32.
    if encoders::SimdLevel::detected() > encoders::SimdLevel::Avx2 {
        let (_, avx2_loss) = trained(&["--blocks-precision", "bf16"], Some("avx2"));
        assert!(
            (avx2_loss - bf16_loss).abs() <= 1e-3 * bf16_loss.abs(),
            "bf16 at avx2: loss {avx2_loss}, at the widest level {bf16_loss}"
        );
    }
    let shown = json(&ok(lazarus(
        &root,
        &["experiments", "show", &bf16_run, "--json"],
    )));
    assert_eq!(shown["params"]["blocks_precision"], "bf16", "{shown:#}");
    let card = json(
        &std::fs::read_to_string(
            root.join("experiments/runs")
                .join(&bf16_run)
                .join("model_card.json"),
        )
        .unwrap(),
    );
    assert_eq!(card["config"]["unfreeze"]["precision"], "bf16", "{card:#}");
    let cached = root.parent().unwrap().join("tree/class1/img003.png");
    let bundle = temp.path().join("bundle");
    let (by_run, by_bundle, _) = answers_of_run_and_bundle(&root, &bf16_run, &cached, &bundle);
    assert_eq!(by_bundle[0]["top"], by_run[0]["top"]);
    assert_eq!(by_bundle[1]["top"], by_run[1]["top"]);

    let mut args = one_epoch_from_block_10("5");
    args.extend_from_slice(&["--blocks-precision", "f16"]);
    let refused = fails(lazarus(&root, &args));
    assert!(
        refused.contains("unknown blocks precision \"f16\": use f32, bf16 or auto"),
        "{refused}"
    );
    refused_without_blocks(&root, "--blocks-precision", "bf16");
}

/// `--blocks-precision auto` times a micro-batch of the run's maps in f32
/// and in bf16 and trains in what it took: the run records `auto` as asked
/// (param, config, model card), the choice and its timings (param
/// `blocks_precision_chosen`, the inputs file), and its blocks file the
/// precision every answer repeats. A resume repeats the recorded choice
/// instead of timing again: the test records the other precision in the
/// killed run's inputs file and finds it in the resumed run's blocks.
#[test]
fn auto_precision_is_timed_recorded_and_repeated_by_a_resume() {
    let temp = tempfile::tempdir().unwrap();
    let root = fine_tuning_root(&temp.path().join("one"), &[8, 8]);
    let report = json(&ok(one_epoch_with(&root, &["--blocks-precision", "auto"])));
    let run = report["run_id"].as_str().unwrap().to_string();
    let shown = json(&ok(lazarus(
        &root,
        &["experiments", "show", &run, "--json"],
    )));
    assert_eq!(shown["params"]["blocks_precision"], "auto", "{shown:#}");
    let chosen = shown["params"]["blocks_precision_chosen"]
        .as_str()
        .unwrap_or_else(|| panic!("no blocks_precision_chosen: {shown:#}"))
        .to_string();
    let precision = BlocksPrecision::parse(&chosen).unwrap();
    assert_eq!(run_blocks(&root, &run).info().precision, precision);
    let run_dir = root.join("experiments/runs").join(&run);
    let inputs = json(&std::fs::read_to_string(run_dir.join("config.json")).unwrap());
    let recorded = &inputs["blocks_precision"];
    assert_eq!(recorded["precision"], chosen.as_str(), "{inputs:#}");
    for key in ["f32_seconds", "bf16_seconds"] {
        assert!(recorded[key].as_f64().unwrap() > 0.0, "{inputs:#}");
    }
    assert_eq!(recorded["n_images"], 8, "{inputs:#}");
    // `train --json` and metrics.json say it too.
    assert_eq!(&report["blocks_precision"], recorded, "{report:#}");
    let metrics = json(&std::fs::read_to_string(run_dir.join("metrics.json")).unwrap());
    assert_eq!(&metrics["blocks_precision"], recorded, "{metrics:#}");
    // Without --json, train says it in a line.
    let mut args = one_epoch_from_block_10("3");
    args.retain(|arg| *arg != "--json");
    args.extend_from_slice(&["--blocks-precision", "auto"]);
    let said = ok(lazarus(&root, &args));
    // (Its own timing: the choice may differ from the first run's.)
    assert!(
        ["f32", "bf16"]
            .iter()
            .any(|precision| said.contains(&format!(
                "blocks precision auto: {precision} (a training pass of 8 maps took"
            ))),
        "{said}"
    );
    assert_eq!(inputs["config"]["unfreeze"]["precision"], "auto");
    let card = json(&std::fs::read_to_string(run_dir.join("model_card.json")).unwrap());
    assert_eq!(card["config"]["unfreeze"]["precision"], "auto", "{card:#}");

    let killed = fine_tuning_root(&temp.path().join("killed"), &[8, 8]);
    let mut args = TRAIN.to_vec();
    args.extend([
        "--unfreeze-from",
        "10",
        "--epochs",
        "16",
        "--batch-size",
        "4",
        "--blocks-precision",
        "auto",
        "--seed",
        "7",
    ]);
    let run_dir = kill_after_checkpoint(&killed, &args, 2);
    let resumed_run = run_dir.file_name().unwrap().to_str().unwrap().to_string();
    let inputs_path = run_dir.join("config.json");
    let mut inputs = json(&std::fs::read_to_string(&inputs_path).unwrap());
    let first =
        BlocksPrecision::parse(inputs["blocks_precision"]["precision"].as_str().unwrap()).unwrap();
    let other = match first {
        BlocksPrecision::F32 => BlocksPrecision::Bf16,
        BlocksPrecision::Bf16 => BlocksPrecision::F32,
    };
    inputs["blocks_precision"]["precision"] = other.name().into();
    std::fs::write(&inputs_path, serde_json::to_vec_pretty(&inputs).unwrap()).unwrap();
    ok(lazarus(
        &killed,
        &["train", "--resume", &resumed_run, "--json"],
    ));
    assert_eq!(run_blocks(&killed, &resumed_run).info().precision, other);
    // The run's params keep what it took at its start.
    let shown = json(&ok(lazarus(
        &killed,
        &["experiments", "show", &resumed_run, "--json"],
    )));
    assert_eq!(
        shown["params"]["blocks_precision_chosen"],
        first.name(),
        "{shown:#}"
    );
}

/// A sweep's fine-tuned points under `blocks_precision = "auto"` share one
/// timing (the process keeps its decision for the same blocks, maps and
/// micro-batch), and each point trains as `train` does with that precision.
#[test]
fn a_sweeps_fine_tuned_points_share_one_precision_timing_and_train_as_train_does() {
    let temp = tempfile::tempdir().unwrap();
    let root = fine_tuning_root(temp.path(), &[8, 8]);
    let file = temp.path().join("finetune.toml");
    std::fs::write(
        &file,
        format!(
            r#"
name = "tree-finetune"
dataset = "tree"
encoder = "{ENCODER}"
unfreeze_from = 10
epochs = 1
batch_size = 8
blocks_precision = "auto"
[grid]
seed = [3, 4]
"#
        ),
    )
    .unwrap();
    let swept = lazarus(&root, &["sweep", file.to_str().unwrap()]);
    ok(swept.clone());
    // One timing, said once (on stderr, beside the sweep's other notes).
    let notes = support::stderr(&swept);
    assert_eq!(
        notes.matches("blocks precision auto: ").count(),
        1,
        "{notes}"
    );
    let listed = json(&ok(lazarus(
        &root,
        &[
            "experiments",
            "list",
            "--where",
            "sweep=tree-finetune",
            "--json",
        ],
    )));
    let runs: Vec<String> = listed
        .as_array()
        .unwrap_or_else(|| panic!("{listed:#}"))
        .iter()
        .map(|run| run["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(runs.len(), 2, "{listed:#}");
    let recorded: Vec<serde_json::Value> = runs
        .iter()
        .map(|run| {
            let config = root.join("experiments/runs").join(run).join("config.json");
            json(&std::fs::read_to_string(config).unwrap())["blocks_precision"].clone()
        })
        .collect();
    assert!(recorded[0].is_object(), "{recorded:?}");
    assert_eq!(recorded[0], recorded[1], "one timing for both points");
    let chosen = recorded[0]["precision"].as_str().unwrap();
    for run in &runs {
        let shown = json(&ok(lazarus(&root, &["experiments", "show", run, "--json"])));
        let seed = shown["params"]["seed"].as_f64().unwrap().to_string();
        let alone = run_of(lazarus(&root, &{
            let mut args = one_epoch_from_block_10(&seed);
            args.extend_from_slice(&["--blocks-precision", chosen]);
            args
        }));
        assert_eq!(
            run_blocks(&root, run).blocks().parameters(),
            run_blocks(&root, &alone).blocks().parameters(),
            "seed {seed}"
        );
    }
}

#[test]
fn blocks_drop_path_trains_other_blocks_repeats_from_its_seed_and_is_recorded() {
    let temp = tempfile::tempdir().unwrap();
    let root = fine_tuning_root(temp.path(), &[8, 8]);
    let fine_tune = |extra: &[&str]| one_epoch_with(&root, extra);
    let plain = run_of(fine_tune(&[]));
    // Blocks 12..=14 (Lite0's residual blocks after block 10) skip their
    // branch for some images: other blocks than without, the same again.
    let (_, _, params) = repeated_and_changed_by(&root, &["--blocks-drop-path", "0.5"], &plain);
    assert_eq!(params["blocks_drop_path"], 0.5, "{params:#}");
    let shown = json(&ok(lazarus(
        &root,
        &["experiments", "show", &plain, "--json"],
    )));
    assert!(
        shown["params"].get("blocks_drop_path").is_none(),
        "{shown:#}"
    );

    let refused = fails(fine_tune(&["--blocks-drop-path", "1"]));
    assert!(
        refused.contains("blocks drop-path rate 1 must be in [0, 1)"),
        "{refused}"
    );
    refused_without_blocks(&root, "--blocks-drop-path", "0.2");
}

/// `--mix-maps`: mixup and CutMix of the training maps (train::mix's unit
/// tests check the mixing itself against hand-computed blends and boxes).
#[test]
fn mixed_maps_train_other_blocks_repeat_from_their_seed_and_are_recorded() {
    let temp = tempfile::tempdir().unwrap();
    let root = fine_tuning_root(temp.path(), &[8, 8]);
    let fine_tune = |extra: &[&str]| one_epoch_with(&root, extra);
    let plain = run_of(fine_tune(&[]));
    let mut trained = Vec::new();
    for mix in ["mixup:0.4", "cutmix:1"] {
        let (_, blocks, params) = repeated_and_changed_by(&root, &["--mix-maps", mix], &plain);
        assert_eq!(params["mix_maps"], mix, "{params:#}");
        trained.push(blocks);
    }
    assert_ne!(trained[0], trained[1], "mixup and CutMix train alike");

    // Partners and the weight are drawn per batch: a budget that splits the
    // batch of 8 into micro-batches of 3 mixes the same maps (the training
    // loss agrees to rounding; mixing within each micro-batch would change
    // the pairs and the loss by far more).
    let whole = json(&ok(fine_tune(&["--mix-maps", "cutmix:1"])));
    let plan = &whole["plan"];
    assert_eq!(plan["micro_batch"], 8, "{whole:#}");
    let budget =
        plan["fixed_bytes"].as_u64().unwrap() + 3 * plan["per_example_bytes"].as_u64().unwrap();
    let budget = budget.to_string();
    let split = json(&ok(fine_tune(&[
        "--mix-maps",
        "cutmix:1",
        "--memory-budget",
        &budget,
    ])));
    assert_eq!(split["plan"]["micro_batch"], 3, "{split:#}");
    let loss = |report: &serde_json::Value| report["epochs"][0]["train/loss"].as_f64().unwrap();
    assert!(
        (loss(&whole) - loss(&split)).abs() < 1e-5 * loss(&whole),
        "{} against {}",
        loss(&whole),
        loss(&split)
    );
    let shown = json(&ok(lazarus(
        &root,
        &["experiments", "show", &plain, "--json"],
    )));
    assert!(shown["params"].get("mix_maps").is_none(), "{shown:#}");

    for bad in ["mixup", "mixup:0", "blend:0.2", "cutmix:-1"] {
        let refused = fails(fine_tune(&["--mix-maps", bad]));
        assert!(
            refused.contains(&format!("unknown map mixing \"{bad}\"")),
            "{bad}: {refused}"
        );
    }
    refused_without_blocks(&root, "--mix-maps", "mixup:0.2");
}

/// `answers_of_run_and_bundle` of a training image of `fine_tuning_root(dir)`
/// and a new one: the run and its bundle give the same top classes.
fn answer_alike_from_run_and_bundle(root: &Path, run: &str, dir: &Path) {
    let cached = dir.join("tree/class0/img000.png");
    let (by_run, by_bundle, images) =
        answers_of_run_and_bundle(root, run, &cached, &dir.join("bundle"));
    for image in 0..images.len() {
        assert_eq!(
            by_run[image]["top"], by_bundle[image]["top"],
            "image {image}"
        );
    }
}

/// `--ema`: evaluation, the kept epoch and the run's files use the moving
/// average of the blocks' and the head's weights.
#[test]
fn averaged_weights_are_kept_recorded_repeated_and_answer_alike_from_run_and_bundle() {
    let temp = tempfile::tempdir().unwrap();
    let root = fine_tuning_root(temp.path(), &[8, 8]);
    let fine_tune = |extra: &[&str]| one_epoch_with(&root, extra);
    let plain = run_of(fine_tune(&[]));
    // Two steps of batch 8: the average (decay (1 + step) / (10 + step))
    // stays near the pretrained blocks, away from the trained ones.
    let (averaged, _, params) = repeated_and_changed_by(&root, &["--ema", "0.9"], &plain);
    assert_eq!(params["ema"], 0.9, "{params:#}");
    answer_alike_from_run_and_bundle(&root, &averaged, temp.path());
    let refused = fails(fine_tune(&["--ema", "1"]));
    assert!(
        refused.contains("weight average decay 1 must be in [0, 1)"),
        "{refused}"
    );
    refused_without_blocks(&root, "--ema", "0.99");
}

/// `--blocks-pool mean-max`: the head reads each channel's mean and maximum
/// over the trained head convolution's map (train::blocks' unit tests check
/// the maxima and their gradients against candle's autograd).
#[test]
fn mean_max_pooled_blocks_are_recorded_standardised_and_answer_alike_from_run_and_bundle() {
    let temp = tempfile::tempdir().unwrap();
    let root = fine_tuning_root(temp.path(), &[8, 8]);
    let fine_tune = |extra: &[&str]| one_epoch_with(&root, extra);
    let plain = run_of(fine_tune(&[]));
    let (pooled, _, params) =
        repeated_and_changed_by(&root, &["--blocks-pool", "mean-max"], &plain);
    assert_eq!(params["blocks_pool"], "mean-max", "{params:#}");
    let shown = json(&ok(lazarus(
        &root,
        &["experiments", "show", &plain, "--json"],
    )));
    assert!(shown["params"].get("blocks_pool").is_none(), "{shown:#}");
    let blocks = run_blocks(&root, &pooled);
    assert_eq!(blocks.info().pooling, BlocksPooling::MeanMax);
    assert_eq!(blocks.blocks().pooling(), BlocksPooling::MeanMax);
    let channels = blocks.blocks().head_channels();
    assert_eq!(blocks.blocks().feature_dim(), 2 * channels);
    assert_eq!(
        run_blocks(&root, &plain).info().pooling,
        BlocksPooling::Mean
    );
    // The head file standardises the means with the folder's statistics
    // (as without maxima) and the maxima with their own, which differ.
    let head = |run: &str| {
        let path = root
            .join("experiments/runs")
            .join(run)
            .join("head.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let floats = |name: &str| -> Vec<f32> {
            tensors
                .tensor(name)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        (floats("input_mean"), floats("input_std"))
    };
    let (mean, std) = head(&pooled);
    let (plain_mean, plain_std) = head(&plain);
    assert_eq!((mean.len(), std.len()), (2 * channels, 2 * channels));
    assert_eq!(mean[..channels], plain_mean[..]);
    assert_eq!(std[..channels], plain_std[..]);
    assert!(
        mean[channels..]
            .iter()
            .zip(&mean[..channels])
            .any(|(max, mean)| max > mean),
        "the maxima's means are the means'"
    );
    answer_alike_from_run_and_bundle(&root, &pooled, temp.path());
    let refused = fails(fine_tune(&["--blocks-pool", "max"]));
    assert!(
        refused.contains("unknown blocks pooling \"max\": use mean or mean-max"),
        "{refused}"
    );
    refused_without_blocks(&root, "--blocks-pool", "mean-max");
}

#[test]
fn a_fine_tuned_run_killed_mid_training_resumes_to_the_same_metrics() {
    let temp = tempfile::tempdir().unwrap();
    let killed = fine_tuning_root(&temp.path().join("killed"), &[8, 8]);
    let clean = fine_tuning_root(&temp.path().join("clean"), &[8, 8]);
    let mut args = TRAIN.to_vec();
    args.extend([
        "--unfreeze-from",
        "10",
        "--head",
        "mlp",
        "--hidden",
        "32",
        "--dropout",
        "0.2",
        "--epochs",
        "24",
        "--batch-size",
        "4",
        "--schedule",
        "cosine",
        "--warmup-steps",
        "4",
        "--augment-maps",
        "dihedral",
        "--blocks-drop-path",
        "0.3",
        "--mix-maps",
        "mixup:0.4",
        "--ema",
        "0.95",
        "--blocks-pool",
        "mean-max",
        "--seed",
        "7",
    ]);
    let run_dir = kill_after_checkpoint(&killed, &args, 2);
    let run = run_dir.file_name().unwrap().to_str().unwrap().to_string();
    let resumed = json(&ok(lazarus(
        &killed,
        &["train", "--resume", &run, "--json"],
    )));
    assert!(
        resumed["resumed_from_epoch"].as_u64().unwrap() >= 2,
        "{resumed:#}"
    );
    let uninterrupted = json(&ok(lazarus(&clean, &args)));
    assert_eq!(resumed["epochs_run"], uninterrupted["epochs_run"]);
    assert_eq!(resumed["epochs"], uninterrupted["epochs"]);
    assert_eq!(resumed["test"], uninterrupted["test"]);
    assert_eq!(
        resumed["test_confusion_matrix"],
        uninterrupted["test_confusion_matrix"]
    );
    // The same blocks, bit for bit.
    let clean_run = uninterrupted["run_id"].as_str().unwrap();
    assert_eq!(
        run_blocks(&killed, &run).blocks().parameters(),
        run_blocks(&clean, clean_run).blocks().parameters()
    );
}

//! `enqueue --layers` and `--image-size/--resize` (issue 22): pooled
//! features of several encoder stages, or at another input square, are their
//! own feature set, and every reader of a run made on them (train, sweep,
//! predict through the encoder, export and the bundle) computes them the same
//! way. Random-weight efficientnet-lite0 on generated images.

use crate::support;

use std::path::Path;

use support::{fails, image_folder, json, lazarus, ok};

fn enqueue(root: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "enqueue",
        "--dataset",
        "toy",
        "--encoder",
        "efficientnet-lite0",
        "--weights",
        "random:3",
        "--json",
    ];
    args.extend_from_slice(extra);
    json(&ok(lazarus(root, &args)))
}

fn feature_dim(root: &Path, fingerprint: &str) -> usize {
    lazarus::features::FeatureSet::open(&root.join("features").join(fingerprint))
        .unwrap()
        .feature_dim()
}

/// `lazarus train` on dataset toy (lite0, 2 epochs, JSON) with `extra` flags.
fn train_toy(root: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--dataset",
        "toy",
        "--encoder",
        "efficientnet-lite0",
        "--epochs",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    lazarus(root, &args)
}

/// The feature folder a run recorded (`run_dir` may be relative to the root).
fn run_fingerprint(root: &Path, report: &serde_json::Value) -> String {
    let run_dir = root.join(report["run_dir"].as_str().unwrap());
    let inputs = std::fs::read_to_string(run_dir.join("config.json")).unwrap();
    json(&inputs)["fingerprint"].as_str().unwrap().to_string()
}

#[test]
fn layers_are_their_own_features_and_every_reader_uses_them() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let tree = image_folder(root, &[12, 12]);
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    let last = enqueue(root, &[]);
    let all = enqueue(root, &["--layers", "all"]);
    // The same layers named as a list are the same configuration.
    let again = enqueue(root, &["--layers", "head,7,6,5,4,3,2,1"]);
    let last = last["fingerprint"].as_str().unwrap().to_string();
    let all_fingerprint = all["fingerprint"].as_str().unwrap().to_string();
    assert_ne!(last, all_fingerprint);
    assert_eq!(again["fingerprint"], all["fingerprint"]);
    assert_eq!(again["images_enqueued"], 0, "{again}");
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    // Lite0: stages of 16+24+40+80+112+192+320 channels, then the 1280 head.
    assert_eq!(feature_dim(root, &last), 1280);
    assert_eq!(feature_dim(root, &all_fingerprint), 2064);

    // Two pooled sets of one encoder: train asks which.
    let train = |extra: &[&str]| train_toy(root, extra);
    let error = fails(train(&[]));
    assert!(error.contains("--layers"), "{error}");
    assert!(error.contains("layers 1,2,3,4,5,6,7,head"), "{error}");
    let report = json(&ok(train(&["--layers", "all"])));
    assert_eq!(run_fingerprint(root, &report), all_fingerprint);
    let report_last = json(&ok(train(&["--layers", "last"])));
    assert_eq!(run_fingerprint(root, &report_last), last);
    let error = fails(train(&["--layers", "5,6"]));
    assert!(error.contains("of layers 5,6"), "{error}");
    assert!(error.contains("--layers 5,6"), "{error}");
    let error = fails(train(&["--layers", "5,6", "--task", "segment"]));
    assert!(error.contains("--layers picks pooled features"), "{error}");

    // A new file goes through the encoder: it must compute the run's layers
    // (a head of 2064 inputs on 1280 features would fail), and agree with
    // the cached row of the same pixels.
    let run = report["run_id"].as_str().unwrap().to_string();
    let cached = root.join("tree/class0/img000.png");
    let fresh = root.join("fresh.png");
    support::reencoded_png(&cached, &fresh);
    let both = [cached.to_str().unwrap(), fresh.to_str().unwrap()];
    let predict = |source: &[&str]| {
        let mut args = vec!["predict"];
        args.extend_from_slice(source);
        args.extend_from_slice(&both);
        args.push("--json");
        json(&ok(lazarus(root, &args)))
    };
    let from_run = predict(&["--run", &run]);
    let from_cache = &from_run[0];
    let from_encoder = &from_run[1];
    assert_eq!(from_cache["features_from"], "cache");
    assert_eq!(from_encoder["features_from"], "encoder");
    assert_eq!(from_encoder["top"][0][0], from_cache["top"][0][0]);
    let difference = (from_encoder["top"][0][1].as_f64().unwrap()
        - from_cache["top"][0][1].as_f64().unwrap())
    .abs();
    assert!(difference < 1e-2, "cache vs encoder: {difference}");

    // The bundle records the layers: its encoder computes the same features.
    let bundle = root.join("bundle");
    ok(lazarus(
        root,
        &["export", &run, "--out", bundle.to_str().unwrap()],
    ));
    let encoder_json = std::fs::read_to_string(bundle.join("encoder.json")).unwrap();
    assert_eq!(
        json(&encoder_json)["layers"],
        "1,2,3,4,5,6,7,head",
        "{encoder_json}"
    );
    // A bundle has no cache: both files (the same pixels) go through its
    // encoder, and agree with the run's encoder answer.
    let from_bundle = predict(&["--bundle", bundle.to_str().unwrap()]);
    for answer in from_bundle.as_array().unwrap() {
        assert_eq!(answer["features_from"], "encoder");
        assert_eq!(answer["top"], from_encoder["top"], "{answer}");
    }

    // A sweep over layers: one pass per feature set, each run on its own.
    let sweep = root.join("layers.toml");
    std::fs::write(
        &sweep,
        "name = \"layers\"\ndataset = \"toy\"\nencoder = \"efficientnet-lite0\"\nepochs = 3\n\
         [grid]\nlayers = [\"last\", \"all\"]\n",
    )
    .unwrap();
    let outcome = json(&ok(lazarus(
        root,
        &["sweep", sweep.to_str().unwrap(), "--json"],
    )));
    let trained = outcome["trained"].as_array().unwrap();
    assert_eq!(trained.len(), 2, "{outcome}");
    let mut fingerprints: Vec<String> = trained
        .iter()
        .map(|run| run_fingerprint(root, run))
        .collect();
    fingerprints.sort();
    let mut expected = vec![last.clone(), all_fingerprint.clone()];
    expected.sort();
    assert_eq!(fingerprints, expected);
    // Folders named on a grid: the chart leaves out the axis no run records.
    let folders = root.join("folders.toml");
    std::fs::write(
        &folders,
        format!(
            "name = \"folders\"\ndataset = \"toy\"\nencoder = \"efficientnet-lite0\"\nepochs = 1\n\
             [grid]\nfingerprint = [\"{last}\", \"{all_fingerprint}\"]\nhead = [\"linear\", \"mlp\"]\n"
        ),
    )
    .unwrap();
    let outcome = json(&ok(lazarus(
        root,
        &["sweep", folders.to_str().unwrap(), "--json"],
    )));
    assert_eq!(outcome["trained"].as_array().unwrap().len(), 4, "{outcome}");
    assert!(
        !outcome["charts"].as_array().unwrap().is_empty(),
        "{outcome}"
    );

    // drift picks the folder the same way.
    let error = fails(lazarus(
        root,
        &["drift", "--reference", "toy", "--candidate", "toy"],
    ));
    assert!(error.contains("--layers"), "{error}");
    let drift = json(&ok(lazarus(
        root,
        &[
            "drift",
            "--reference",
            "toy",
            "--candidate",
            "toy",
            "--layers",
            "all",
            "--json",
        ],
    )));
    assert_eq!(drift["feature_dim"], 2064, "{drift}");

    // Runs record how their features were computed: an ablation axis.
    let table = ok(lazarus(
        root,
        &[
            "experiments",
            "ablate",
            "--by",
            "layers,image_size,resize",
            "--metric",
            "test/accuracy",
            "--where",
            "sweep=layers",
        ],
    ));
    assert!(table.contains("1,2,3,4,5,6,7,head"), "{table}");
    assert!(table.contains("last"), "{table}");
    assert!(table.contains("224"), "{table}");
    assert!(table.contains("crop"), "{table}");
}

#[test]
fn layers_are_refused_where_they_cannot_apply() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let tree = image_folder(root, &[2, 2]);
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    let enqueue = |encoder: &str, layers: &str| {
        lazarus(
            root,
            &[
                "enqueue",
                "--dataset",
                "toy",
                "--encoder",
                encoder,
                "--weights",
                "random:1",
                "--layers",
                layers,
            ],
        )
    };
    let error = fails(enqueue("resnet18", "all"));
    assert!(error.contains("resnet18"), "{error}");
    assert!(error.contains("efficientnet-lite"), "{error}");
    for bad in ["8", "0,1", "5,5", "conv3"] {
        let error = fails(enqueue("efficientnet-lite0", bad));
        assert!(
            error.contains(&format!("--layers '{bad}'")),
            "{bad}: {error}"
        );
    }
    // The refusals enqueued nothing: a valid request still covers every image.
    let outcome = json(&ok(lazarus(
        root,
        &[
            "enqueue",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--weights",
            "random:1",
            "--layers",
            "6,7",
            "--json",
        ],
    )));
    assert_eq!(outcome["images_enqueued"], 4, "{outcome}");
    assert_eq!(outcome["already_covered"], 0, "{outcome}");
}

#[test]
fn an_input_size_is_its_own_feature_set_and_predict_reads_it_the_same_way() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let tree = image_folder(root, &[6, 6]);
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    let default = enqueue(root, &[]);
    // Lite0's own square and crop, named: the same configuration.
    let named = enqueue(root, &["--image-size", "224", "--resize", "crop"]);
    assert_eq!(named["fingerprint"], default["fingerprint"]);
    let stretched = enqueue(root, &["--image-size", "64", "--resize", "stretch"]);
    let fingerprint = stretched["fingerprint"].as_str().unwrap().to_string();
    assert_ne!(stretched["fingerprint"], default["fingerprint"]);
    assert_eq!(stretched["images_enqueued"], 12);
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let set =
        lazarus::features::FeatureSet::open(&root.join("features").join(&fingerprint)).unwrap();
    let recorded = set.metadata()["preprocess"].clone();
    let preprocess = json(&recorded);
    assert_eq!(preprocess["input_size"], 64, "{recorded}");
    assert_eq!(preprocess["resize"]["policy"], "stretch", "{recorded}");

    let train = |extra: &[&str]| train_toy(root, extra);
    // Two pooled folders: the refusal says how each was made.
    let error = fails(train(&[]));
    assert!(error.contains("64 px stretch"), "{error}");
    assert!(error.contains("224 px crop"), "{error}");
    let report = json(&ok(train(&["--image-size", "64", "--resize", "stretch"])));
    assert_eq!(run_fingerprint(root, &report), fingerprint);
    let run = report["run_id"].as_str().unwrap().to_string();
    let cached = root.join("tree/class1/img002.png");
    let fresh = root.join("fresh.png");
    support::reencoded_png(&cached, &fresh);
    let answers = json(&ok(lazarus(
        root,
        &[
            "predict",
            "--run",
            &run,
            cached.to_str().unwrap(),
            fresh.to_str().unwrap(),
            "--json",
        ],
    )));
    // The encoder read the fresh file at 64 px stretched, as the worker did.
    assert_eq!(answers[0]["features_from"], "cache");
    assert_eq!(answers[1]["features_from"], "encoder");
    assert_eq!(answers[1]["top"][0][0], answers[0]["top"][0][0]);
    let difference = (answers[1]["top"][0][1].as_f64().unwrap()
        - answers[0]["top"][0][1].as_f64().unwrap())
    .abs();
    assert!(difference < 1e-2, "cache vs encoder: {difference}");

    // `pad` (whole image, aspect kept) is a third configuration, recorded
    // and picked by name like the others.
    let padded = enqueue(root, &["--image-size", "64", "--resize", "pad"]);
    let padded_fingerprint = padded["fingerprint"].as_str().unwrap().to_string();
    assert_ne!(padded_fingerprint, fingerprint);
    assert_eq!(padded["images_enqueued"], 12);
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let set = lazarus::features::FeatureSet::open(&root.join("features").join(&padded_fingerprint))
        .unwrap();
    let recorded = json(&set.metadata()["preprocess"]);
    assert_eq!(recorded["resize"]["policy"], "pad", "{recorded}");
    let report = json(&ok(train(&["--image-size", "64", "--resize", "pad"])));
    assert_eq!(run_fingerprint(root, &report), padded_fingerprint);

    // Families that read one square only are refused, naming the encoder.
    let error = fails(lazarus(
        root,
        &[
            "enqueue",
            "--dataset",
            "toy",
            "--encoder",
            "resnet18",
            "--weights",
            "random:1",
            "--image-size",
            "300",
        ],
    ));
    assert!(error.contains("resnet18"), "{error}");
    assert!(error.contains("efficientnet-lite"), "{error}");
    let error = fails(lazarus(
        root,
        &[
            "enqueue",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--weights",
            "random:1",
            "--image-size",
            "4096",
        ],
    ));
    assert!(error.contains("--image-size 4096"), "{error}");
}

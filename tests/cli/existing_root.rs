//! A root written by main 43c34c5, before issue 21's redesign (datasets,
//! queue, feature shards of pooled and spatial features, a classification,
//! an image-level anomaly, a patch-level anomaly and a segmentation run, an
//! exported bundle), still works with today's verbs: its features verify and
//! train new heads, its runs and its bundle predict what they predicted
//! then, its run configs hash as they did (sweeps skip them as FINISHED),
//! and its classification run exports the same head again.
//! tests/fixtures/root-43c34c5/README.md says how it was made.

use std::path::{Path, PathBuf};

use crate::support::{self, fails, json, lazarus, ok};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/root-43c34c5")
}

/// Where make_root.sh made the images: the manifests name them there.
const MADE_AT: &str = "/tmp/fxold/images";

/// A copy of the fixture (root/, bundle/, images/) in a temporary folder:
/// the verbs write to it. The manifests' image paths are moved to the
/// copy's images/ (patch-level scoring and segmentation read the images
/// and masks their manifests name), as a user who moves a root with its
/// images would edit them; nothing else changes.
fn copy_fixture() -> tempfile::TempDir {
    let source = fixture();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    for file in support::files_under(&source) {
        let relative = file.strip_prefix(&source).unwrap();
        let top = relative.components().next().unwrap().as_os_str();
        if !["root", "bundle", "images"].iter().any(|keep| top == *keep) {
            continue;
        }
        let target = dir.path().join(relative);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        if relative.starts_with("root/jobs/datasets") {
            let text = std::fs::read_to_string(&file).unwrap();
            let moved = text.replace(MADE_AT, images.to_str().unwrap());
            std::fs::write(&target, moved).unwrap();
        } else {
            std::fs::copy(&file, &target).unwrap();
        }
    }
    dir
}

fn expected(name: &str) -> Value {
    let path = fixture().join("expected").join(name);
    json(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn run_id(kind: &str) -> String {
    expected("runs.json")[kind].as_str().unwrap().to_string()
}

/// The image files the fixture predicted on, under `dir`'s copy.
fn part_images(dir: &Path) -> Vec<String> {
    ["parts/good/00.png", "parts/bad/00.png", "new/part.png"]
        .iter()
        .map(|image| dir.join("images").join(image).display().to_string())
        .collect()
}

fn blob_images(dir: &Path) -> Vec<String> {
    ["blobs/images/000.png", "new/blob.png"]
        .iter()
        .map(|image| dir.join("images").join(image).display().to_string())
        .collect()
}

/// Whether an answer of today agrees with the fixture's: every key the
/// fixture has, with an equal value (keys may be added, never renamed or
/// dropped), but for the folders file paths start with (compared by file
/// name); numbers within `1e-6` relative (the same arithmetic gives the
/// same bits; the margin keeps the test about behaviour, not about the last
/// digit of a printed float).
fn assert_same_answer(now: &Value, then: &Value, at: &str) {
    match (now, then) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1e-12),
                "{at}: {a} now, {b} in the fixture"
            );
        }
        (Value::String(a), Value::String(b)) if a.starts_with('/') || b.starts_with('/') => {
            assert_eq!(
                Path::new(a).file_name(),
                Path::new(b).file_name(),
                "{at}: paths name other files"
            );
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{at}: lengths differ");
            for (index, (a, b)) in a.iter().zip(b).enumerate() {
                assert_same_answer(a, b, &format!("{at}[{index}]"));
            }
        }
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in b {
                let now = a
                    .get(key)
                    .unwrap_or_else(|| panic!("{at}: no key {key} today"));
                assert_same_answer(now, value, &format!("{at}.{key}"));
            }
        }
        (a, b) => assert_eq!(a, b, "{at}"),
    }
}

/// The PNG files of one `predict --out` folder equal the fixture's, by name.
fn assert_same_pictures(now: &Path, then_name: &str) {
    let then = fixture().join("expected").join(then_name);
    let names = |dir: &Path| {
        support::files_under(dir)
            .into_iter()
            .map(|file| file.strip_prefix(dir).unwrap().to_path_buf())
            .filter(|file| !file.starts_with(".lazarus-output.json"))
            .collect::<Vec<_>>()
    };
    let wanted = names(&then);
    assert!(!wanted.is_empty(), "{} holds no pictures", then.display());
    assert_eq!(names(now), wanted, "{}", now.display());
    for file in wanted {
        let (a, b) = (
            image::open(now.join(&file)).unwrap(),
            image::open(then.join(&file)).unwrap(),
        );
        assert!(
            a.as_bytes() == b.as_bytes(),
            "{} differs from the fixture's",
            file.display()
        );
    }
}

#[test]
fn runs_and_the_bundle_of_an_earlier_root_predict_what_they_predicted_then() {
    let dir = copy_fixture();
    let root = dir.path().join("root");
    let parts = part_images(dir.path());
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let blobs = blob_images(dir.path());
    let blobs: Vec<&str> = blobs.iter().map(String::as_str).collect();
    let predict = |source: &[&str], images: &[&str], out: Option<&Path>| -> Value {
        let mut args = vec!["predict"];
        args.extend_from_slice(source);
        args.extend_from_slice(images);
        let out = out.map(|out| out.display().to_string());
        if let Some(out) = &out {
            args.extend(["--out", out.as_str()]);
        }
        args.push("--json");
        json(&ok(lazarus(&root, &args)))
    };

    let classify = run_id("classify");
    let now = predict(&["--run", &classify], &parts, None);
    assert_same_answer(&now, &expected("classify-predict.json"), "classify");
    // Two of the three images come from the old cache, one from the encoder.
    let sources: Vec<&str> = now
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["features_from"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["cache", "cache", "encoder"]);

    let bundle = dir.path().join("bundle");
    let bundle = bundle.to_str().unwrap();
    let now = predict(&["--bundle", bundle], &parts, None);
    assert_same_answer(&now, &expected("bundle-predict.json"), "bundle");

    let anomaly = run_id("anomaly");
    let now = predict(&["--run", &anomaly], &parts, None);
    assert_same_answer(&now, &expected("anomaly-predict.json"), "anomaly");

    let patch = run_id("patch");
    let maps = dir.path().join("patch-maps");
    let now = predict(&["--run", &patch], &parts, Some(&maps));
    assert_same_answer(&now, &expected("patch-predict.json"), "patch");
    assert_same_pictures(&maps, "patch-maps");

    let segment = run_id("segment");
    let masks = dir.path().join("segment-masks");
    let now = predict(&["--run", &segment], &blobs, Some(&masks));
    assert_same_answer(&now, &expected("segment-predict.json"), "segment");
    assert_same_pictures(&masks, "segment-masks");
}

#[test]
fn an_earlier_root_verifies_lists_its_runs_trains_on_its_features_and_exports_again() {
    let dir = copy_fixture();
    let root = dir.path().join("root");

    let verified = json(&ok(lazarus(&root, &["verify", "--json"])));
    // 16 pooled rows of parts, 16 + 6 spatial rows of parts and blobs.
    assert_eq!(
        (&verified["ok"], &verified["corrupt"], &verified["rows"]),
        (&Value::Bool(true), &Value::from(0), &Value::from(38)),
        "the fixture's shards: {verified:#}"
    );

    let listed = json(&ok(lazarus(&root, &["experiments", "list", "--json"])));
    assert_same_answer(&listed, &expected("experiments-list.json"), "list");

    // New heads of every task on the old shards as they are.
    for args in [
        &["--epochs", "1"][..],
        &["--task", "anomaly", "--normal-label", "good"],
        &[
            "--task",
            "anomaly",
            "--spatial",
            "--normal-label",
            "good",
            "--channels",
            "8",
        ],
    ] {
        let mut train = vec![
            "train",
            "--dataset",
            "parts",
            "--encoder",
            "efficientnet-lite0",
            "--json",
        ];
        train.extend_from_slice(args);
        ok(lazarus(&root, &train));
    }
    ok(lazarus(
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
            "1",
            "--batch-size",
            "4",
            "--json",
        ],
    ));

    // The old classification run exports the head it exported then.
    let again = dir.path().join("bundle-again");
    ok(lazarus(
        &root,
        &[
            "export",
            &run_id("classify"),
            "--out",
            again.to_str().unwrap(),
        ],
    ));
    for file in ["head.safetensors", "classes.json", "encoder.json"] {
        assert_eq!(
            support::file_sha256(&again.join(file)),
            support::file_sha256(&dir.path().join("bundle").join(file)),
            "{file} of the bundle exported again"
        );
    }
}

#[test]
fn sweeps_find_the_runs_of_an_earlier_root_finished_by_their_config_hash() {
    let dir = copy_fixture();
    let root = dir.path().join("root");
    // The settings each fixture run was trained with (make_root.sh).
    let sweeps = [
        (
            "classify",
            "dataset = \"parts\"\nepochs = 3\nbatch_size = 8\n",
        ),
        (
            "anomaly",
            "dataset = \"parts\"\ntask = \"anomaly\"\nnormal_label = \"good\"\n",
        ),
        (
            "patch",
            "dataset = \"parts\"\ntask = \"anomaly\"\nspatial = true\nnormal_label = \"good\"\n\
             channels = 16\ncoreset = 64\n",
        ),
        (
            "segment",
            "dataset = \"blobs\"\ntask = \"segment\"\nepochs = 2\nbatch_size = 4\n",
        ),
    ];
    for (kind, settings) in sweeps {
        let file = dir.path().join(format!("{kind}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"fixture\"\nencoder = \"efficientnet-lite0\"\n{settings}\n[grid]\nseed = [0]\n"
            ),
        )
        .unwrap();
        let outcome = json(&ok(lazarus(
            &root,
            &["sweep", file.to_str().unwrap(), "--json"],
        )));
        let skipped: Vec<&str> = outcome["skipped"]
            .as_array()
            .unwrap_or_else(|| panic!("{kind}: {outcome:#}"))
            .iter()
            .map(|pair| pair[1].as_str().unwrap())
            .collect();
        assert_eq!(skipped, [run_id(kind)], "{kind}: {outcome:#}");
    }
    // A run id is not a path, even for a root written earlier.
    let message = fails(lazarus(&root, &["predict", "--run", "nope", "x.png"]));
    assert!(message.contains("run nope not found"), "{message}");
}

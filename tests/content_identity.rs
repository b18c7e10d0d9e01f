//! Feature rows belong to image content (issue 18), through the real binary.

mod support;

use std::path::{Path, PathBuf};

use support::{lazarus, ok};

const SAMPLES: [&str; 3] = ["chelsea.png", "coffee.png", "rocket.jpg"];

fn sample(name: &str) -> PathBuf {
    let path = lazarus::weights::cache_root().join("samples").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch_assets.sh",
        path.display()
    );
    path
}

/// Registers a dataset of one unlabeled photo and enqueues it for Lite0
/// with its installed ImageNet weights.
fn add_photo_dataset(root: &Path, name: &str, photo: &str) {
    let folder = root.join("sources").join(name);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(sample(photo), folder.join(photo)).unwrap();
    ok(lazarus(
        root,
        &["dataset", "add", name, folder.to_str().unwrap()],
    ));
    ok(lazarus(
        root,
        &[
            "enqueue",
            "--dataset",
            name,
            "--encoder",
            "efficientnet-lite0",
        ],
    ));
}

/// The pooled features of the one image of dataset `name`.
fn pooled_of(root: &Path, name: &str) -> Vec<f32> {
    let layout = lazarus::layout::Layout::new(root);
    let dir = layout.features_dir().join(name);
    let fingerprint = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let set = lazarus::features::FeatureSet::open(&fingerprint).unwrap();
    assert_eq!(set.len(), 1, "{name}: one row");
    set.pooled(0).iter().map(|v| v.to_f32()).collect()
}

fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The bug of issue 18: one worker, several datasets on one encoder
/// fingerprint. Each dataset's row must be its own photo's features, as
/// computed by lazarus for that dataset alone (reference: the same binary,
/// one dataset per root; the encoder itself is checked against PyTorch in
/// tests/encoder_parity.rs).
#[test]
fn one_worker_extracts_each_dataset_from_its_own_images() {
    let shared = tempfile::tempdir().unwrap();
    let names = ["cat", "cup", "rocket"];
    for (name, photo) in names.iter().zip(SAMPLES) {
        add_photo_dataset(shared.path(), name, photo);
    }
    ok(lazarus(shared.path(), &["run-worker", "--until-empty"]));

    let mut alone = Vec::new();
    for (name, photo) in names.iter().zip(SAMPLES) {
        let root = tempfile::tempdir().unwrap();
        add_photo_dataset(root.path(), name, photo);
        ok(lazarus(root.path(), &["run-worker", "--until-empty"]));
        alone.push(pooled_of(root.path(), name));
    }
    // The three photos are far apart, so a row of the wrong photo shows.
    for i in 0..3 {
        for j in i + 1..3 {
            assert!(max_abs_difference(&alone[i], &alone[j]) > 0.1);
        }
    }
    for (name, expected) in names.iter().zip(&alone) {
        let together = pooled_of(shared.path(), name);
        let difference = max_abs_difference(&together, expected);
        assert!(
            difference < 1e-3,
            "{name}: features differ from its photo's by up to {difference}"
        );
    }
}

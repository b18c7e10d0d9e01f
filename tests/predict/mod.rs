//! Trained runs on new images: predict, bundles, review and serve.

use std::path::Path;

use crate::support::{image_folder, json, lazarus, ok};

mod bundle;
mod predict_images;
mod review;
mod serve;

/// A toy dataset (two classes of 12 generated images) extracted with a
/// random-weight efficientnet-lite0 and a linear head trained on it: the
/// run id.
fn linear_run(root: &Path) -> String {
    let tree = image_folder(root, &[12, 12]);
    ok(lazarus(
        root,
        &["dataset", "add", "toy", tree.to_str().unwrap()],
    ));
    ok(lazarus(
        root,
        &[
            "enqueue",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--weights",
            "random:3",
        ],
    ));
    ok(lazarus(root, &["run-worker", "--until-empty"]));
    let report = json(&ok(lazarus(
        root,
        &[
            "train",
            "--dataset",
            "toy",
            "--encoder",
            "efficientnet-lite0",
            "--epochs",
            "3",
            "--json",
        ],
    )));
    report["run_id"].as_str().unwrap().to_string()
}

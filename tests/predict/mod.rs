//! Trained runs on new images: predict, bundles, review and serve.

use std::path::Path;

use crate::support::{json, lazarus, ok};

mod bundle;
mod predict_images;
mod review;
mod serve;

/// A toy dataset (two classes of 12 generated images) extracted with a
/// random-weight efficientnet-lite0 and a linear head trained on it: the
/// run id.
fn linear_run(root: &Path) -> String {
    crate::support::extract_toy(root, &[12, 12]);
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

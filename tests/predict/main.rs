//! Trained runs on new images: predict, bundles, review and serve.
//!
//! One test binary for several files: linking one binary instead of one per
//! file is most of what a clean build of the tests costs.

#[path = "../support/mod.rs"]
mod support;

mod bundle;
mod predict;
mod review;
mod serve;

//! Encoders: every registered family, ImageNet photos, spatial maps, and
//! parity with the PyTorch reference.
//!
//! One test binary for several files: linking one binary instead of one per
//! file is most of what a clean build of the tests costs.

#[path = "../support/mod.rs"]
mod support;

mod encoder_families;
mod encoder_imagenet;
mod encoder_maps;
mod encoder_parity;

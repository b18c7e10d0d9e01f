//! Feature shards and stores: the content-addressed cache, object stores,
//! damaged caches and drift.
//!
//! One test binary for several files: linking one binary instead of one per
//! file is most of what a clean build of the tests costs.

#[path = "../support/mod.rs"]
mod support;

mod content_identity;
mod damaged_cache;
mod drift;
mod feature_object_store;
mod feature_store;
mod feature_store_cli;
mod pooled_inputs;
mod views;

//! Feature shards and stores: the content-addressed cache, object stores,
//! damaged caches and drift.

mod content_identity;
mod damaged_cache;
mod drift;
mod feature_object_store;
mod feature_store;
mod feature_store_cli;
mod pooled_inputs;
mod views;

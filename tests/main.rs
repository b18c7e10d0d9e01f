//! Every integration test in one binary: the CLI and the library driven from
//! outside, grouped by the part of the data path they exercise.
//!
//! One binary instead of one per group: it is linked once, and its long tests
//! (crash and kill tests, serving, fine-tuning) overlap with the short ones
//! instead of each group waiting for its slowest test on its own (on 2 cores,
//! six binaries ran one after another with a core idle behind each tail).
//! Select a group with its module path: `cargo test --test integration queue::`.

mod support;

mod cli;
mod encoders;
mod features;
mod predict;
mod queue;
mod training;

//! lazarus: run a frozen image encoder once, in resumable micro-jobs, and train
//! small heads on the cached features.
//!
//! The library holds all logic; the `lazarus` binary only parses arguments,
//! validates them into settings and calls one function per verb.
//! See ARCHITECTURE.md for the code map and the invariants.

pub mod atomic;
pub mod bundle;
pub mod dataset;
pub mod digest;
pub mod drift;
pub mod encoders;
pub mod experiments;
pub mod extract;
pub mod features;
pub mod files;
pub mod html;
pub mod layout;
pub mod memory;
pub mod output_dir;
pub mod predict;
pub mod predict_anomaly;
pub mod preprocess;
pub mod queue;
pub mod review;
pub mod segment;
pub mod serve;
pub mod train;
pub mod weights;

/// The version recorded in every artifact lazarus writes.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

//! Head-only training on cached features (issue 7).
//!
//! This first slice holds the evaluation metrics; heads, optimisers, batching
//! and the `lazarus train` verb build on it.

pub mod metrics;

/// Errors at the training boundary.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Inputs to a metric or a run do not fit together.
    #[error("invalid training input: {0}")]
    Invalid(String),
}

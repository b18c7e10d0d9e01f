//! The job queue: both backends' contract, worker processes, races, crashes
//! and failures.
//!
//! One test binary for several files: linking one binary instead of one per
//! file is most of what a clean build of the tests costs.

#[path = "../support/mod.rs"]
mod support;

mod enqueue_race;
mod queue_contract;
mod queue_processes;
mod worker_crash;
mod worker_failures;
mod worker_robustness;

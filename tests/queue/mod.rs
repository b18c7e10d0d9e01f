//! The job queue: both backends' contract, worker processes, races, crashes
//! and failures.

mod enqueue_race;
mod queue_contract;
mod queue_processes;
mod worker_crash;
mod worker_failures;
mod worker_robustness;
mod worker_superseded;

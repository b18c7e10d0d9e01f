//! The job kinds a worker can run today. `noop` jobs complete at once (tests,
//! benchmark); `extract` jobs need feature extraction (issue 5) and are not
//! claimed, so they stay pending until a worker that can run them exists.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::KIND_NOOP;
use super::plan::NoopPayload;
use crate::queue::worker::{Executor, Outcome};
use crate::queue::{ItemFailure, JobResult, Lease};

/// Runs every job kind this build can execute.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobRunner;

impl Executor for JobRunner {
    fn kinds(&self) -> Vec<String> {
        vec![KIND_NOOP.to_string()]
    }

    fn execute(&self, lease: &Lease, stop: &AtomicBool) -> Outcome {
        match lease.kind.as_str() {
            KIND_NOOP => run_noop(lease, stop),
            other => Outcome::Failed(format!("this worker cannot run jobs of kind '{other}'")),
        }
    }
}

fn run_noop(lease: &Lease, stop: &AtomicBool) -> Outcome {
    let payload: NoopPayload = match serde_json::from_str(&lease.payload) {
        Ok(payload) => payload,
        Err(err) => return Outcome::Failed(format!("malformed noop payload: {err}")),
    };
    if let Some(dir) = &payload.marker_dir {
        // create_new: a second execution of the same attempt would fail loudly.
        let path = dir.join(format!("job-{}-attempt-{}", lease.job_id, lease.attempt));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut file| writeln!(file, "{}", lease.worker));
        if let Err(err) = written {
            return Outcome::Failed(format!("{}: {err}", path.display()));
        }
    }
    let until = Instant::now() + Duration::from_millis(payload.sleep_ms);
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return Outcome::Interrupted;
        }
        std::thread::sleep(
            until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(20)),
        );
    }
    let failures = payload
        .fail_items
        .iter()
        .map(|item| ItemFailure {
            item: item.clone(),
            reason: "asked to fail by the noop payload".to_string(),
        })
        .collect();
    Outcome::Completed(JobResult {
        failures,
        detail: serde_json::json!({ "worker": lease.worker, "attempt": lease.attempt }),
    })
}

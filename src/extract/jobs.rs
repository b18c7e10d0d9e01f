//! The job kinds a worker runs: `extract` (a chunk of images through an
//! encoder into a feature shard, see `run`) and `noop` (completes at once;
//! for tests and the queue benchmark).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::plan::NoopPayload;
use super::run::Extractor;
use super::{KIND_EXTRACT, KIND_NOOP};
use crate::queue::worker::{Executor, Outcome};
use crate::queue::{ItemFailure, JobResult, Lease};

/// Runs every job kind this build can execute.
pub struct JobRunner {
    extractor: Extractor,
}

impl JobRunner {
    pub fn new(extractor: Extractor) -> Self {
        JobRunner { extractor }
    }
}

impl Executor for JobRunner {
    fn kinds(&self) -> Vec<String> {
        vec![KIND_EXTRACT.to_string(), KIND_NOOP.to_string()]
    }

    fn execute(&self, lease: &Lease, stop: &AtomicBool) -> Outcome {
        match lease.kind.as_str() {
            KIND_EXTRACT => self.extractor.execute(lease, stop),
            KIND_NOOP => run_noop(lease, stop),
            other => Outcome::Failed(format!("this worker cannot run jobs of kind '{other}'")),
        }
    }

    fn superseded(&self, lease: &Lease) -> Result<(), String> {
        match lease.kind.as_str() {
            KIND_EXTRACT => self.extractor.discard(lease),
            _ => Ok(()),
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
        if stop.load(Ordering::SeqCst) && !payload.ignore_stop {
            return Outcome::Interrupted;
        }
        std::thread::sleep(
            until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(20)),
        );
    }
    if let Some(message) = &payload.panic {
        panic!("{message}");
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

//! A jobs/queue.db and an experiments/experiments.db written by main 43c34c5
//! (before the queue's state machine and the SQLite plumbing were shared)
//! still open, read and write. tests/fixtures/databases-43c34c5/README.md
//! says how they were made and what they hold.

use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lazarus::experiments::{ExperimentsDb, RunFilter, RunStart, RunStatus};
use lazarus::layout::Layout;
use lazarus::queue::sqlite::SqliteQueue;
use lazarus::queue::{JobResult, JobState, ManualClock, Queue, RequeueFilter, RetryPolicy};
use support::{json, lazarus, ok};

/// The fixture's clock: every job was written at this time (plus 1 s).
const START_MS: i64 = 1_700_000_000_000;

/// A copy of the fixture root (the tests write to it).
fn fixture_root() -> tempfile::TempDir {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/databases-43c34c5");
    let dir = tempfile::tempdir().unwrap();
    for file in support::files_under(&source) {
        let relative = file.strip_prefix(&source).unwrap();
        // The root: jobs/ and experiments/; not the notes on how it was made.
        if !(relative.starts_with("jobs") || relative.starts_with("experiments")) {
            continue;
        }
        let target = dir.path().join(relative);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&file, &target).unwrap();
    }
    dir
}

#[test]
fn a_queue_written_by_main_keeps_every_job_state_and_takes_new_work() {
    let dir = fixture_root();
    let clock = ManualClock::new(START_MS + 2_000);
    let policy = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_secs(10),
        max_delay: Duration::from_secs(60),
    };
    let queue = SqliteQueue::open_with(
        &dir.path().join("jobs/queue.db"),
        Arc::new(clock.clone()),
        policy,
    )
    .unwrap();

    let done = queue.job(1).unwrap();
    assert_eq!(done.state, JobState::Done);
    let result = done.result.unwrap();
    assert_eq!(result.failures.len(), 1);
    assert_eq!(result.failures[0].item, "img-3");
    assert_eq!(result.detail["by"], "w1");
    assert_eq!(
        queue.job(2).unwrap().state,
        JobState::Failed {
            retry_at_ms: START_MS + 11_000,
            last_error: "boom once".into()
        }
    );
    assert_eq!(
        queue.job(3).unwrap().state,
        JobState::Dead {
            last_error: "boom for good".into()
        }
    );
    assert_eq!(
        queue.job(4).unwrap().state,
        JobState::Running {
            worker: "w3".into(),
            attempt: 1,
            lease_deadline_ms: START_MS + 1_000 + 600_000
        }
    );
    assert_eq!(queue.job(5).unwrap().state, JobState::Pending);
    let old = queue.job(6).unwrap();
    assert!(old.superseded, "{old:?}");

    let status = queue.status(None).unwrap();
    let groups: Vec<_> = status
        .groups
        .iter()
        .map(|g| (g.group.as_str(), g.fingerprint.as_str(), g.jobs.total()))
        .collect();
    assert_eq!(groups, [("g", "fp", 4), ("h", "fp", 1)]);
    let jobs = status.job_totals();
    assert_eq!(
        (
            jobs.pending,
            jobs.running,
            jobs.done,
            jobs.failed,
            jobs.dead
        ),
        (1, 1, 1, 1, 1)
    );
    let items = status.item_totals();
    assert_eq!((items.total, items.done, items.failed), (20, 3, 1));
    assert_eq!(status.failed_items.len(), 1);
    assert_eq!(status.dead_jobs[0].job_id, 3);
    assert_eq!(status.failed_jobs[0].retry_at_ms, Some(START_MS + 11_000));

    // New work: the failed job is due after its backoff, then the pending
    // one; the running job is reclaimed once its lease expires (the new
    // leases outlast it).
    clock.advance(Duration::from_secs(10));
    let lease = Duration::from_secs(3600);
    let retried = queue.claim("w9", &["noop"], lease).unwrap();
    assert_eq!(
        retried.as_ref().map(|l| (l.job_id, l.attempt)),
        Some((2, 2))
    );
    let pending = queue.claim("w9", &["noop"], lease).unwrap();
    assert_eq!(pending.map(|l| l.job_id), Some(5));
    clock.advance(Duration::from_secs(600));
    let reclaimed = queue.claim("w9", &["noop"], lease).unwrap().unwrap();
    assert_eq!((reclaimed.job_id, reclaimed.attempt), (4, 2));
    queue
        .complete(4, reclaimed.attempt, &JobResult::default())
        .unwrap();
    assert_eq!(queue.job(4).unwrap().state, JobState::Done);
    let requeued = queue
        .requeue(&RequeueFilter {
            group: None,
            failed: false,
            dead: true,
        })
        .unwrap();
    assert_eq!(requeued, 1);
    drop(queue);

    // The CLI reads it too.
    let status = json(&ok(lazarus(dir.path(), &["status", "--json"])));
    assert_eq!(status["jobs"]["done"], 2, "{status}");
    assert_eq!(status["jobs"]["pending"], 1, "{status}");
    assert_eq!(status["images"]["failed"], 1, "{status}");
}

#[test]
fn an_experiments_database_written_by_main_lists_shows_and_records_runs() {
    let dir = fixture_root();
    let layout = Layout::new(dir.path());
    let db = ExperimentsDb::open(&layout).unwrap();
    let runs = db.list_runs(&RunFilter::default()).unwrap();
    let mut seen: Vec<(String, RunStatus)> = runs
        .iter()
        .map(|r| (r.config_hash.clone(), r.status))
        .collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        [
            ("config-1".to_string(), RunStatus::Finished),
            ("config-2".to_string(), RunStatus::Failed)
        ]
    );
    let finished = runs.iter().find(|r| r.config_hash == "config-1").unwrap();
    let detail = db.show_run(&finished.id).unwrap();
    assert_eq!(detail.summary["val_accuracy"], 0.71);
    assert_eq!(detail.tags["note"], "fixture");
    let accuracy = detail
        .metrics
        .iter()
        .find(|m| m.key == "val_accuracy")
        .unwrap();
    assert_eq!((accuracy.steps, accuracy.last_step), (3, 2));
    assert!((accuracy.last_value - 0.71).abs() < 1e-12, "{accuracy:?}");
    assert_eq!(
        db.find_resumable("config-2").unwrap().as_deref(),
        Some(
            runs.iter()
                .find(|r| r.config_hash == "config-2")
                .unwrap()
                .id
                .as_str()
        )
    );

    // A new run lands next to the old ones.
    let run = db
        .start_run(RunStart {
            experiment: "fixture".into(),
            dataset: "toy".into(),
            encoder_fingerprint: "fp".into(),
            config_hash: "config-3".into(),
            params: Vec::new(),
            tags: Vec::new(),
        })
        .unwrap();
    run.log_metrics(0, &[("val_accuracy", 0.9)]).unwrap();
    run.finish(RunStatus::Finished, &[("val_accuracy", 0.9)])
        .unwrap();
    drop(db);

    let listed = json(&ok(lazarus(
        dir.path(),
        &["experiments", "list", "--json", "--experiment", "fixture"],
    )));
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
}

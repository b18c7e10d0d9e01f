//! A job superseded (`enqueue --force`) while a worker runs it: the queue
//! refuses the late completion, and the worker asks its executor to undo
//! the run's output (`Executor::superseded`); a job that completes normally
//! beside it is left alone. Library API, SQLite queue, a scripted executor.

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use lazarus::queue::sqlite::SqliteQueue;
use lazarus::queue::worker::{self, Executor, Outcome, StopReason, WorkerConfig};
use lazarus::queue::{JobResult, Lease, NewJob, Queue};

/// Completes every job; for group `forced`, supersedes the job's
/// configuration first, as a concurrent `enqueue --force` would.
struct ForcedMidRun<'a> {
    queue: &'a SqliteQueue,
    discarded: Mutex<Vec<i64>>,
}

impl Executor for ForcedMidRun<'_> {
    fn kinds(&self) -> Vec<String> {
        vec!["work".to_string()]
    }

    fn execute(&self, lease: &Lease, _stop: &AtomicBool) -> Outcome {
        if lease.group == "forced" {
            let retired = self
                .queue
                .supersede(&lease.group, &lease.variant, &lease.fingerprint)
                .unwrap();
            assert_eq!(retired, 1);
        }
        Outcome::Completed(JobResult {
            failures: Vec::new(),
            detail: serde_json::json!({"rows": 1}),
        })
    }

    fn superseded(&self, lease: &Lease) -> Result<(), String> {
        self.discarded.lock().unwrap().push(lease.job_id);
        Ok(())
    }
}

fn job(group: &str) -> NewJob {
    NewJob {
        kind: "work".to_string(),
        group: group.to_string(),
        variant: "enc".to_string(),
        fingerprint: format!("fp-{group}"),
        dedup_key: format!("work:{group}"),
        items: 1,
        payload: "{}".to_string(),
    }
}

#[test]
fn a_job_superseded_while_it_ran_has_its_output_undone_and_a_normal_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let queue = SqliteQueue::open(&dir.path().join("jobs/queue.db")).unwrap();
    queue.enqueue(&[job("forced"), job("kept")]).unwrap();
    let executor = ForcedMidRun {
        queue: &queue,
        discarded: Mutex::new(Vec::new()),
    };
    let config = WorkerConfig {
        worker_id: "w1".to_string(),
        lease: Duration::from_secs(30),
        until_empty: true,
        max_jobs: None,
        poll_interval: Duration::from_millis(10),
        stop_deadline: None,
    };
    let report = worker::run(&queue, &executor, &config, &AtomicBool::new(false)).unwrap();
    assert_eq!(report.stopped, StopReason::Empty);
    assert_eq!(
        (
            report.completed,
            report.lease_lost,
            report.superseded_discarded
        ),
        (1, 1, 1),
        "{report:?}"
    );
    assert!(report.discard_failures.is_empty(), "{report:?}");
    let forced_id = (1..=2)
        .find(|&id| queue.job(id).unwrap().group == "forced")
        .unwrap();
    assert!(queue.job(forced_id).unwrap().superseded);
    assert_eq!(*executor.discarded.lock().unwrap(), [forced_id]);
}

/// The same through real processes: `enqueue --force` while a worker runs
/// the dataset's only job. Whichever comes first, the retired job's shard is
/// removed exactly once (by the force if the shard was already there, by
/// the worker if its late completion was refused) and nothing is stale.
#[test]
fn enqueue_force_while_a_worker_runs_the_job_leaves_no_stale_shard() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    use crate::support::{self, image_folder, json, lazarus, ok};

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let tree = image_folder(&root.join("src"), &[32, 32]);
    ok(lazarus(
        root,
        &["dataset", "add", "plants", tree.to_str().unwrap()],
    ));
    let enqueue = [
        "enqueue",
        "--json",
        "--dataset",
        "plants",
        "--encoder",
        "efficientnet-lite0",
        "--weights",
        "random:7",
    ];
    assert_eq!(json(&ok(lazarus(root, &enqueue)))["jobs_added"], 1);
    let worker = support::queue_command(root, None)
        .args(["run-worker", "--until-empty", "--threads", "1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let status = json(&ok(lazarus(root, &["status", "--json"])));
        if status["jobs"]["running"].as_u64().unwrap() >= 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the worker never claimed the job: {status}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut forced_args = enqueue.to_vec();
    forced_args.push("--force");
    let forced = json(&ok(lazarus(root, &forced_args)));
    assert_eq!(forced["superseded"], 1, "{forced}");
    let report = json(&ok(worker.wait_with_output().unwrap()));
    assert_eq!(
        forced["shards_removed"].as_u64().unwrap()
            + report["superseded_discarded"].as_u64().unwrap(),
        1,
        "force: {forced}, worker: {report}"
    );
    eprintln!(
        "removed by the force: {}, by the worker: {}",
        forced["shards_removed"], report["superseded_discarded"]
    );
    // The worker went on to the new job: one row per image, nothing stale.
    let verified = json(&ok(lazarus(root, &["verify", "--json"])));
    assert_eq!(verified["ok"], true, "{verified}");
}

//! The queue contract, written against the `Queue` trait so that every
//! backend runs the same tests: `sqlite` always, `postgres` against the server
//! in `LAZARUS_TEST_POSTGRES` (required when `CI=true`), each test in a schema
//! of its own. Time comes from a `ManualClock`, so lease expiry and backoff
//! are tested without sleeping.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use lazarus::queue::postgres::PostgresQueue;
use lazarus::queue::sqlite::SqliteQueue;
use lazarus::queue::{
    ItemFailure, JobResult, JobState, KindBacklog, ManualClock, NewJob, Plan, Queue, QueueError,
    RequeueFilter, RetryPolicy,
};

const START_MS: i64 = 1_700_000_000_000;
const LEASE: Duration = Duration::from_secs(10);

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_secs(10),
        max_delay: Duration::from_secs(25),
    }
}

/// A fresh SQLite queue in its own temp dir, with a manual clock.
fn sqlite(_test: &str) -> Option<(tempfile::TempDir, ManualClock, SqliteQueue)> {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let queue = SqliteQueue::open_with(
        &dir.path().join("jobs").join("queue.db"),
        Arc::new(clock.clone()),
        policy(),
    )
    .unwrap();
    Some((dir, clock, queue))
}

/// A fresh PostgreSQL queue in its own schema, with a manual clock; `None`
/// when no test server is configured (outside CI).
fn postgres(test: &str) -> Option<(support::postgres::Schema, ManualClock, PostgresQueue)> {
    let server = support::postgres::server(test)?;
    let schema = support::postgres::Schema::create(&server);
    let clock = ManualClock::new(START_MS);
    let queue = PostgresQueue::open_with(&schema.url, Arc::new(clock.clone()), policy()).unwrap();
    Some((schema, clock, queue))
}

fn job(key: &str, kind: &str, group: &str, items: u64) -> NewJob {
    NewJob {
        kind: kind.to_string(),
        group: group.to_string(),
        variant: "enc".to_string(),
        fingerprint: "fp".to_string(),
        dedup_key: key.to_string(),
        items,
        payload: format!("{{\"key\":\"{key}\"}}"),
    }
}

fn ok_result(tag: &str) -> JobResult {
    JobResult {
        failures: Vec::new(),
        detail: serde_json::json!({ "by": tag }),
    }
}

fn is_lease_lost<T: std::fmt::Debug>(result: Result<T, QueueError>) -> bool {
    matches!(result, Err(QueueError::LeaseLost { .. }))
}

fn claim_complete_roundtrip(queue: &dyn Queue) {
    let report = queue.enqueue(&[job("a", "noop", "g", 4)]).unwrap();
    assert_eq!((report.added, report.skipped), (1, 0));
    let lease = queue.claim("w1", &["noop"], LEASE).unwrap().unwrap();
    assert_eq!(lease.attempt, 1);
    assert_eq!(lease.payload, "{\"key\":\"a\"}");
    assert_eq!(lease.items, 4);
    match queue.job(lease.job_id).unwrap().state {
        JobState::Running {
            worker, attempt, ..
        } => assert_eq!((worker.as_str(), attempt), ("w1", 1)),
        other => panic!("expected running, got {other:?}"),
    }
    assert!(queue.claim("w2", &["noop"], LEASE).unwrap().is_none());
    queue
        .complete(lease.job_id, lease.attempt, &ok_result("w1"))
        .unwrap();
    let record = queue.job(lease.job_id).unwrap();
    assert_eq!(record.state, JobState::Done);
    assert_eq!(record.result, Some(ok_result("w1")));
    // A second completion of the same attempt is refused: done once.
    assert!(is_lease_lost(queue.complete(
        lease.job_id,
        lease.attempt,
        &ok_result("again")
    )));
    assert_eq!(
        queue.job(lease.job_id).unwrap().result,
        Some(ok_result("w1"))
    );
}

fn expired_lease_is_reclaimed_and_the_old_attempt_fenced(queue: &dyn Queue, clock: &ManualClock) {
    queue.enqueue(&[job("a", "noop", "g", 1)]).unwrap();
    let old = queue.claim("slow", &["noop"], LEASE).unwrap().unwrap();
    clock.advance(Duration::from_secs(9));
    assert!(
        queue.claim("fast", &["noop"], LEASE).unwrap().is_none(),
        "lease still valid"
    );
    clock.advance(Duration::from_secs(2));
    let new = queue.claim("fast", &["noop"], LEASE).unwrap().unwrap();
    assert_eq!((new.job_id, new.attempt), (old.job_id, 2));
    // The slow worker wakes up: its heartbeat, completion, failure and release are refused.
    assert!(is_lease_lost(queue.heartbeat(
        old.job_id,
        old.attempt,
        LEASE
    )));
    assert!(is_lease_lost(queue.complete(
        old.job_id,
        old.attempt,
        &ok_result("slow")
    )));
    assert!(is_lease_lost(queue.fail(old.job_id, old.attempt, "late")));
    assert!(is_lease_lost(queue.release(old.job_id, old.attempt)));
    queue
        .complete(new.job_id, new.attempt, &ok_result("fast"))
        .unwrap();
    let record = queue.job(new.job_id).unwrap();
    assert_eq!(record.state, JobState::Done);
    assert_eq!(record.result, Some(ok_result("fast")));
    assert!(is_lease_lost(queue.complete(
        old.job_id,
        old.attempt,
        &ok_result("slow")
    )));
    assert_eq!(
        queue.job(new.job_id).unwrap().result,
        Some(ok_result("fast"))
    );
}

fn heartbeat_extends_the_lease(queue: &dyn Queue, clock: &ManualClock) {
    queue.enqueue(&[job("a", "noop", "g", 1)]).unwrap();
    let lease = queue.claim("w1", &["noop"], LEASE).unwrap().unwrap();
    for _ in 0..5 {
        clock.advance(Duration::from_secs(8));
        let deadline = queue.heartbeat(lease.job_id, lease.attempt, LEASE).unwrap();
        assert_eq!(deadline, START_MS + clock_offset(clock) + 10_000);
        assert!(queue.claim("w2", &["noop"], LEASE).unwrap().is_none());
    }
    clock.advance(Duration::from_secs(11));
    let stolen = queue.claim("w2", &["noop"], LEASE).unwrap().unwrap();
    assert_eq!(stolen.attempt, 2);
}

fn clock_offset(clock: &ManualClock) -> i64 {
    lazarus::queue::Clock::now_ms(clock) - START_MS
}

fn failures_back_off_exponentially_then_die(queue: &dyn Queue, clock: &ManualClock) {
    queue.enqueue(&[job("a", "noop", "g", 1)]).unwrap();
    // Tries 1 and 2 fail with 10 s then 20 s of backoff; try 3 is the last.
    for (try_number, backoff_secs) in [(1u32, 10u64), (2, 20)] {
        let lease = queue.claim("w", &["noop"], LEASE).unwrap().unwrap();
        assert_eq!(lease.attempt, try_number);
        let state = queue.fail(lease.job_id, lease.attempt, "boom").unwrap();
        let expected_retry = lazarus::queue::Clock::now_ms(clock) + backoff_secs as i64 * 1000;
        assert_eq!(
            state,
            JobState::Failed {
                retry_at_ms: expected_retry,
                last_error: "boom".to_string()
            }
        );
        clock.advance(Duration::from_secs(backoff_secs) - Duration::from_millis(1));
        assert!(
            queue.claim("w", &["noop"], LEASE).unwrap().is_none(),
            "not claimable before retry_at"
        );
        clock.advance(Duration::from_millis(1));
    }
    let lease = queue.claim("w", &["noop"], LEASE).unwrap().unwrap();
    assert_eq!(lease.attempt, 3);
    let state = queue
        .fail(lease.job_id, lease.attempt, "final boom")
        .unwrap();
    assert_eq!(
        state,
        JobState::Dead {
            last_error: "final boom".to_string()
        }
    );
    clock.advance(Duration::from_secs(3600));
    assert!(
        queue.claim("w", &["noop"], LEASE).unwrap().is_none(),
        "dead stays dead"
    );
    let status = queue.status(None).unwrap();
    assert_eq!(status.job_totals().dead, 1);
    assert_eq!(status.dead_jobs.len(), 1);
    assert_eq!(status.dead_jobs[0].last_error, "final boom");
    assert_eq!(status.dead_jobs[0].tries, 3);

    // requeue brings it back with fresh tries.
    let requeued = queue
        .requeue(&RequeueFilter {
            group: None,
            failed: false,
            dead: true,
        })
        .unwrap();
    assert_eq!(requeued, 1);
    let lease = queue.claim("w", &["noop"], LEASE).unwrap().unwrap();
    assert_eq!(lease.attempt, 4, "the fencing counter never goes back");
    assert_eq!(queue.job(lease.job_id).unwrap().tries, 1);
}

fn backoff_is_capped() {
    let policy = policy();
    assert_eq!(policy.backoff(1), Duration::from_secs(10));
    assert_eq!(policy.backoff(2), Duration::from_secs(20));
    assert_eq!(policy.backoff(3), Duration::from_secs(25));
    assert_eq!(policy.backoff(60), Duration::from_secs(25));
}

fn workers_that_keep_dying_make_a_job_dead(queue: &dyn Queue, clock: &ManualClock) {
    queue.enqueue(&[job("a", "noop", "g", 1)]).unwrap();
    for attempt in 1..=3 {
        let lease = queue.claim("w", &["noop"], LEASE).unwrap().unwrap();
        assert_eq!(lease.attempt, attempt);
        clock.advance(Duration::from_secs(11)); // the worker dies silently
    }
    assert!(queue.claim("w", &["noop"], LEASE).unwrap().is_none());
    let status = queue.status(None).unwrap();
    assert_eq!(status.job_totals().dead, 1);
    assert!(
        status.dead_jobs[0].last_error.contains("lease expired"),
        "{:?}",
        status.dead_jobs
    );
}

fn release_gives_the_job_back_without_spending_a_try(queue: &dyn Queue) {
    queue.enqueue(&[job("a", "noop", "g", 1)]).unwrap();
    let first = queue.claim("w1", &["noop"], LEASE).unwrap().unwrap();
    queue.release(first.job_id, first.attempt).unwrap();
    assert_eq!(queue.job(first.job_id).unwrap().state, JobState::Pending);
    assert_eq!(queue.job(first.job_id).unwrap().tries, 0);
    assert!(is_lease_lost(queue.release(first.job_id, first.attempt)));
    let second = queue.claim("w2", &["noop"], LEASE).unwrap().unwrap();
    assert_eq!(
        second.attempt, 2,
        "a new attempt number fences the released one"
    );
    assert!(is_lease_lost(queue.complete(
        first.job_id,
        first.attempt,
        &ok_result("w1")
    )));
    queue
        .complete(second.job_id, second.attempt, &ok_result("w2"))
        .unwrap();
}

fn claims_only_the_kinds_asked_for(queue: &dyn Queue) {
    queue
        .enqueue(&[job("x", "extract", "g", 64), job("n", "noop", "g", 0)])
        .unwrap();
    let lease = queue.claim("w", &["noop"], LEASE).unwrap().unwrap();
    assert_eq!(lease.kind, "noop");
    assert!(queue.claim("w", &["noop"], LEASE).unwrap().is_none());
    assert!(queue.claim("w", &[], LEASE).unwrap().is_none());
    queue
        .complete(lease.job_id, lease.attempt, &ok_result("w"))
        .unwrap();
    let running = queue.claim("w", &["extract"], LEASE).unwrap().unwrap();
    queue.enqueue(&[job("y", "extract", "g", 64)]).unwrap();
    assert_eq!(
        queue.backlog_by_kind().unwrap(),
        vec![KindBacklog {
            kind: "extract".to_string(),
            waiting: 1,
            running: 1
        }]
    );
    queue
        .fail(running.job_id, running.attempt, "no executor")
        .unwrap();
    assert_eq!(queue.backlog_by_kind().unwrap()[0].waiting, 2);
}

fn enqueue_is_idempotent_and_supersede_fences(queue: &dyn Queue) {
    let jobs = [job("a", "noop", "g", 2), job("b", "noop", "g", 3)];
    assert_eq!(queue.enqueue(&jobs).unwrap().added, 2);
    let again = queue.enqueue(&jobs).unwrap();
    assert_eq!((again.added, again.skipped), (0, 2));
    assert_eq!(queue.live_payloads("g", "enc", "fp").unwrap().len(), 2);
    let running = queue.claim("w", &["noop"], LEASE).unwrap().unwrap();
    assert_eq!(queue.supersede("g", "enc", "fp").unwrap(), 2);
    assert!(queue.live_payloads("g", "enc", "fp").unwrap().is_empty());
    assert!(is_lease_lost(queue.complete(
        running.job_id,
        running.attempt,
        &ok_result("w")
    )));
    assert_eq!(queue.status(None).unwrap().job_totals().total(), 0);
    // The keys are free again.
    assert_eq!(queue.enqueue(&jobs).unwrap().added, 2);
    assert_eq!(queue.status(None).unwrap().item_totals().total, 5);
}

/// A planner sees the live jobs of its fingerprint (every group), and its
/// plan is applied whole, or not at all when it refuses.
fn plan_and_enqueue_applies_whole_plans_only(queue: &dyn Queue) {
    let mut other = job("o", "noop", "h", 1);
    other.fingerprint = "other-fp".into();
    queue
        .enqueue(&[job("a", "noop", "g", 1), job("b", "noop", "h", 2), other])
        .unwrap();
    let live = queue.live_jobs("fp").unwrap();
    let groups: Vec<&str> = live.iter().map(|j| j.group.as_str()).collect();
    assert_eq!(
        groups,
        ["g", "h"],
        "both groups, oldest first, not other-fp"
    );
    assert!(live.iter().all(|j| j.state == "pending"));
    let first = live[0].id;

    let mut seen = 0;
    let report = queue
        .plan_and_enqueue("fp", &mut |live| {
            seen = live.len();
            Ok(Plan {
                supersede: vec![live[0].id],
                jobs: vec![job("c", "noop", "g", 4), job("b", "noop", "h", 2)],
            })
        })
        .unwrap();
    assert_eq!(seen, 2);
    assert_eq!(
        (report.superseded, report.added, report.skipped),
        (1, 1, 1),
        "b is live already"
    );
    let live: Vec<i64> = queue
        .live_jobs("fp")
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(live.len(), 2);
    assert!(!live.contains(&first));

    // A refusing planner leaves everything as it was.
    let refused = queue.plan_and_enqueue("fp", &mut |live| {
        assert_eq!(live.len(), 2);
        Err("the planner says no".into())
    });
    match refused {
        Err(QueueError::Plan { message, .. }) => assert_eq!(message, "the planner says no"),
        other => panic!("expected a plan error, got {other:?}"),
    }
    assert_eq!(queue.live_jobs("fp").unwrap().len(), 2);
    assert_eq!(queue.status(None).unwrap().item_totals().total, 2 + 4 + 1);
}

/// Planners of one fingerprint on several connections take turns: each
/// adds a job for "image 1" only when no live job holds it yet, under its
/// own dedup key (so the dedup key cannot hide a race), and sleeps between
/// its read and its plan to widen the window. Exactly one job results.
fn planners_take_turns(queues: &[&dyn Queue]) {
    std::thread::scope(|scope| {
        for (n, queue) in queues.iter().enumerate() {
            scope.spawn(move || {
                queue
                    .plan_and_enqueue("fp", &mut |live| {
                        std::thread::sleep(Duration::from_millis(30));
                        let covered = live.iter().any(|j| j.payload.contains("image 1"));
                        let mut plan = Plan::default();
                        if !covered {
                            let mut new = job(&format!("planner-{n}"), "noop", "g", 1);
                            new.payload = "{\"covers\":\"image 1\"}".into();
                            plan.jobs.push(new);
                        }
                        Ok(plan)
                    })
                    .unwrap();
            });
        }
    });
    let live = queues[0].live_jobs("fp").unwrap();
    assert_eq!(
        live.len(),
        1,
        "one planner saw the image uncovered: {live:?}"
    );
}

#[test]
fn sqlite_planners_of_one_fingerprint_take_turns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs").join("queue.db");
    let queues: Vec<SqliteQueue> = (0..4).map(|_| SqliteQueue::open(&path).unwrap()).collect();
    let refs: Vec<&dyn Queue> = queues.iter().map(|q| q as &dyn Queue).collect();
    planners_take_turns(&refs);
}

#[test]
fn postgres_planners_of_one_fingerprint_take_turns() {
    let Some(server) = support::postgres::server("postgres_planners_take_turns") else {
        return;
    };
    let schema = support::postgres::Schema::create(&server);
    let queues: Vec<PostgresQueue> = (0..4)
        .map(|_| PostgresQueue::open(&schema.url).unwrap())
        .collect();
    let refs: Vec<&dyn Queue> = queues.iter().map(|q| q as &dyn Queue).collect();
    planners_take_turns(&refs);
}

fn per_item_failures_complete_the_rest(queue: &dyn Queue) {
    queue
        .enqueue(&[job("a", "noop", "cats", 5), job("b", "noop", "dogs", 2)])
        .unwrap();
    let lease = queue.claim("w", &["noop"], LEASE).unwrap().unwrap();
    let result = JobResult {
        failures: vec![
            ItemFailure {
                item: "3".to_string(),
                reason: "truncated PNG".to_string(),
            },
            ItemFailure {
                item: "4".to_string(),
                reason: "0 bytes".to_string(),
            },
        ],
        detail: serde_json::Value::Null,
    };
    queue
        .complete(lease.job_id, lease.attempt, &result)
        .unwrap();
    let status = queue.status(None).unwrap();
    let items = status.item_totals();
    assert_eq!((items.total, items.done, items.failed), (7, 3, 2));
    assert_eq!(status.failed_items.len(), 2);
    assert_eq!(status.failed_items[0].item, "3");
    assert_eq!(status.failed_items[0].reason, "truncated PNG");
    assert_eq!(status.failed_items[0].group, "cats");
    // Narrowed to one group.
    let dogs = queue.status(Some("dogs")).unwrap();
    assert_eq!(dogs.groups.len(), 1);
    assert_eq!(dogs.job_totals().pending, 1);
    assert!(dogs.failed_items.is_empty());
}

fn throughput_and_eta_come_from_recent_completions(queue: &dyn Queue, clock: &ManualClock) {
    let jobs: Vec<NewJob> = (0..10)
        .map(|i| job(&format!("j{i}"), "noop", "g", 10))
        .collect();
    queue.enqueue(&jobs).unwrap();
    // Five completions, one every 2 s: 0.5 jobs/s, 5 images/s.
    for _ in 0..5 {
        let lease = queue.claim("w", &["noop"], LEASE).unwrap().unwrap();
        queue
            .complete(lease.job_id, lease.attempt, &ok_result("w"))
            .unwrap();
        clock.advance(Duration::from_secs(2));
    }
    let status = queue.status(None).unwrap();
    let t = status.throughput;
    assert_eq!(t.window_jobs, 5);
    assert!((t.jobs_per_sec.unwrap() - 0.5).abs() < 1e-9, "{t:?}");
    assert!((t.items_per_sec.unwrap() - 5.0).abs() < 1e-9, "{t:?}");
    // 50 images left at 5 images/s.
    assert!((t.eta_secs.unwrap() - 10.0).abs() < 1e-9, "{t:?}");
    assert_eq!(status.groups[0].throughput, t);
}

fn requeue_filters_by_group_and_state(queue: &dyn Queue, clock: &ManualClock) {
    queue
        .enqueue(&[job("a", "noop", "cats", 1), job("b", "noop", "dogs", 1)])
        .unwrap();
    for _ in 0..2 {
        let lease = queue.claim("w", &["noop"], LEASE).unwrap().unwrap();
        queue.fail(lease.job_id, lease.attempt, "x").unwrap();
    }
    let only_dead = RequeueFilter {
        group: None,
        failed: false,
        dead: true,
    };
    assert_eq!(
        queue.requeue(&only_dead).unwrap(),
        0,
        "failed jobs are not dead"
    );
    let cats = RequeueFilter {
        group: Some("cats".to_string()),
        failed: true,
        dead: true,
    };
    assert_eq!(queue.requeue(&cats).unwrap(), 1);
    let lease = queue.claim("w", &["noop"], LEASE).unwrap().unwrap();
    assert_eq!(lease.group, "cats", "requeued job is claimable at once");
    assert!(queue.claim("w", &["noop"], LEASE).unwrap().is_none());
    queue
        .complete(lease.job_id, lease.attempt, &ok_result("w"))
        .unwrap();
    clock.advance(Duration::from_secs(10));
    assert_eq!(
        queue.claim("w", &["noop"], LEASE).unwrap().unwrap().group,
        "dogs"
    );
}

/// Every contract test, against one backend constructor.
macro_rules! contract_tests {
    ($make:path) => {
        #[test]
        fn claim_complete_roundtrip() {
            let Some((_dir, _clock, queue)) = $make("claim_complete_roundtrip") else {
                return;
            };
            super::claim_complete_roundtrip(&queue);
        }
        #[test]
        fn expired_lease_is_reclaimed_and_the_old_attempt_fenced() {
            let Some((_dir, clock, queue)) =
                $make("expired_lease_is_reclaimed_and_the_old_attempt_fenced")
            else {
                return;
            };
            super::expired_lease_is_reclaimed_and_the_old_attempt_fenced(&queue, &clock);
        }
        #[test]
        fn heartbeat_extends_the_lease() {
            let Some((_dir, clock, queue)) = $make("heartbeat_extends_the_lease") else {
                return;
            };
            super::heartbeat_extends_the_lease(&queue, &clock);
        }
        #[test]
        fn failures_back_off_exponentially_then_die() {
            let Some((_dir, clock, queue)) = $make("failures_back_off_exponentially_then_die")
            else {
                return;
            };
            super::failures_back_off_exponentially_then_die(&queue, &clock);
        }
        #[test]
        fn backoff_is_capped() {
            super::backoff_is_capped();
        }
        #[test]
        fn workers_that_keep_dying_make_a_job_dead() {
            let Some((_dir, clock, queue)) = $make("workers_that_keep_dying_make_a_job_dead")
            else {
                return;
            };
            super::workers_that_keep_dying_make_a_job_dead(&queue, &clock);
        }
        #[test]
        fn release_gives_the_job_back_without_spending_a_try() {
            let Some((_dir, _clock, queue)) =
                $make("release_gives_the_job_back_without_spending_a_try")
            else {
                return;
            };
            super::release_gives_the_job_back_without_spending_a_try(&queue);
        }
        #[test]
        fn claims_only_the_kinds_asked_for() {
            let Some((_dir, _clock, queue)) = $make("claims_only_the_kinds_asked_for") else {
                return;
            };
            super::claims_only_the_kinds_asked_for(&queue);
        }
        #[test]
        fn enqueue_is_idempotent_and_supersede_fences() {
            let Some((_dir, _clock, queue)) = $make("enqueue_is_idempotent_and_supersede_fences")
            else {
                return;
            };
            super::enqueue_is_idempotent_and_supersede_fences(&queue);
        }
        #[test]
        fn plan_and_enqueue_applies_whole_plans_only() {
            let Some((_dir, _clock, queue)) = $make("plan_and_enqueue_applies_whole_plans_only")
            else {
                return;
            };
            super::plan_and_enqueue_applies_whole_plans_only(&queue);
        }
        #[test]
        fn per_item_failures_complete_the_rest() {
            let Some((_dir, _clock, queue)) = $make("per_item_failures_complete_the_rest") else {
                return;
            };
            super::per_item_failures_complete_the_rest(&queue);
        }
        #[test]
        fn throughput_and_eta_come_from_recent_completions() {
            let Some((_dir, clock, queue)) =
                $make("throughput_and_eta_come_from_recent_completions")
            else {
                return;
            };
            super::throughput_and_eta_come_from_recent_completions(&queue, &clock);
        }
        #[test]
        fn requeue_filters_by_group_and_state() {
            let Some((_dir, clock, queue)) = $make("requeue_filters_by_group_and_state") else {
                return;
            };
            super::requeue_filters_by_group_and_state(&queue, &clock);
        }
    };
}

mod sqlite_backend {
    use super::sqlite;
    contract_tests!(sqlite);
}

mod postgres_backend {
    use super::postgres;
    contract_tests!(postgres);
}

/// xorshift64*: a tiny deterministic generator, so failures replay by seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Random interleavings of claims, heartbeats, completions, failures,
/// releases, silent crashes and clock jumps by several workers. Invariants:
/// fencing tokens only grow, a call is accepted exactly when its attempt is
/// the job's current running attempt, a job is completed at most once, and
/// after draining every job is done or dead.
/// Returns how many calls were refused, so the caller can check both paths ran.
fn random_interleavings_keep_the_invariants(
    queue: &dyn Queue,
    clock: &ManualClock,
    seed: u64,
) -> (u32, u32) {
    let mut tally = (0, 0);
    const JOBS: usize = 12;
    const WORKERS: usize = 4;
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|i| job(&format!("j{i}"), "noop", "g", 1))
        .collect();
    queue.enqueue(&jobs).unwrap();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut held: Vec<Option<lazarus::queue::Lease>> = vec![None; WORKERS];
    let mut last_attempt = std::collections::HashMap::<i64, u32>::new();
    let mut completions = std::collections::HashMap::<i64, u32>::new();
    for step in 0..300 {
        let w = rng.below(WORKERS as u64) as usize;
        if rng.below(3) == 0 {
            clock.advance(Duration::from_millis(rng.below(12_000)));
        }
        let Some(lease) = held[w].clone() else {
            if let Some(lease) = queue.claim(&format!("w{w}"), &["noop"], LEASE).unwrap() {
                let previous = last_attempt
                    .insert(lease.job_id, lease.attempt)
                    .unwrap_or(0);
                assert!(
                    lease.attempt > previous,
                    "seed {seed} step {step}: token grew"
                );
                assert!(
                    !completions.contains_key(&lease.job_id),
                    "done jobs are not claimed"
                );
                held[w] = Some(lease);
            }
            continue;
        };
        let current = matches!(
            queue.job(lease.job_id).unwrap().state,
            JobState::Running { attempt, .. } if attempt == lease.attempt
        );
        let accepted = match rng.below(6) {
            0 | 1 => {
                let accepted = queue.heartbeat(lease.job_id, lease.attempt, LEASE).is_ok();
                if !accepted {
                    held[w] = None;
                }
                accepted
            }
            2 | 3 => {
                held[w] = None;
                let accepted = queue
                    .complete(lease.job_id, lease.attempt, &ok_result("w"))
                    .is_ok();
                if accepted {
                    *completions.entry(lease.job_id).or_default() += 1;
                }
                accepted
            }
            4 => {
                held[w] = None;
                queue.fail(lease.job_id, lease.attempt, "boom").is_ok()
            }
            _ => {
                held[w] = None;
                if rng.below(2) == 0 {
                    queue.release(lease.job_id, lease.attempt).is_ok()
                } else {
                    continue; // crashed silently: the lease just expires
                }
            }
        };
        assert_eq!(
            accepted, current,
            "seed {seed} step {step}: accepted iff current"
        );
        if accepted {
            tally.0 += 1;
        } else {
            tally.1 += 1;
        }
    }
    // Drain: far in the future every lease and backoff has passed.
    clock.advance(Duration::from_secs(3600));
    while let Some(lease) = queue.claim("drain", &["noop"], LEASE).unwrap() {
        queue
            .complete(lease.job_id, lease.attempt, &ok_result("drain"))
            .unwrap();
        *completions.entry(lease.job_id).or_default() += 1;
    }
    assert!(
        completions.values().all(|&n| n == 1),
        "seed {seed}: completed at most once"
    );
    let totals = queue.status(None).unwrap().job_totals();
    assert_eq!(totals.done as usize, completions.len());
    assert_eq!(
        (totals.done + totals.dead) as usize,
        JOBS,
        "seed {seed}: {totals:?}"
    );
    tally
}

fn check_both_paths_ran(accepted: u32, refused: u32) {
    assert!(
        accepted > 100 && refused > 20,
        "both paths ran: {accepted} accepted, {refused} refused"
    );
}

#[test]
fn sqlite_random_interleavings_keep_the_invariants() {
    let (mut accepted, mut refused) = (0, 0);
    for seed in 1..=8 {
        let (_dir, clock, queue) = sqlite("random interleavings").unwrap();
        let (a, r) = random_interleavings_keep_the_invariants(&queue, &clock, seed);
        accepted += a;
        refused += r;
    }
    check_both_paths_ran(accepted, refused);
}

#[test]
fn postgres_random_interleavings_keep_the_invariants() {
    let (mut accepted, mut refused) = (0, 0);
    for seed in 1..=8 {
        let Some((_schema, clock, queue)) = postgres("postgres_random_interleavings") else {
            return;
        };
        let (a, r) = random_interleavings_keep_the_invariants(&queue, &clock, seed);
        accepted += a;
        refused += r;
    }
    check_both_paths_ran(accepted, refused);
}

/// Workers that start together on an empty database create the schema once
/// (migrations serialise on an advisory lock), and then claim concurrently
/// with `SKIP LOCKED`: every job is claimed and completed exactly once.
#[test]
fn postgres_concurrent_workers_migrate_once_and_claim_each_job_once() {
    let Some(server) = support::postgres::server("postgres_concurrent_workers") else {
        return;
    };
    let schema = support::postgres::Schema::create(&server);
    const THREADS: usize = 6;
    const JOBS: usize = 300;
    let queues: Vec<PostgresQueue> = std::thread::scope(|scope| {
        let opening: Vec<_> = (0..THREADS)
            .map(|_| scope.spawn(|| PostgresQueue::open(&schema.url)))
            .collect();
        opening
            .into_iter()
            .map(|handle| handle.join().unwrap().unwrap())
            .collect()
    });
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|i| job(&format!("j{i}"), "noop", "g", 1))
        .collect();
    assert_eq!(queues[0].enqueue(&jobs).unwrap().added, JOBS as u64);
    let claimed: Vec<Vec<i64>> = std::thread::scope(|scope| {
        let workers: Vec<_> = queues
            .iter()
            .enumerate()
            .map(|(w, queue)| {
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    let name = format!("w{w}");
                    while let Some(lease) = queue.claim(&name, &["noop"], LEASE).unwrap() {
                        assert_eq!(lease.attempt, 1, "job {} claimed twice", lease.job_id);
                        queue
                            .complete(lease.job_id, lease.attempt, &ok_result(&name))
                            .unwrap();
                        mine.push(lease.job_id);
                    }
                    mine
                })
            })
            .collect();
        workers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all: Vec<i64> = claimed.iter().flatten().copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), JOBS, "every job once");
    assert_eq!(
        claimed.iter().map(Vec::len).sum::<usize>(),
        JOBS,
        "no job twice"
    );
    assert!(
        claimed.iter().filter(|mine| !mine.is_empty()).count() >= 2,
        "work was shared: {:?}",
        claimed.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_eq!(
        queues[0].status(None).unwrap().job_totals().done,
        JOBS as u64
    );
}

/// A database whose queue schema is newer than this binary knows is refused
/// and left untouched; a read-only open of an empty schema creates nothing.
#[test]
fn postgres_newer_schema_is_refused_and_missing_schema_is_not_created() {
    let Some(server) = support::postgres::server("postgres_schema_versions") else {
        return;
    };
    let schema = support::postgres::Schema::create(&server);
    assert!(PostgresQueue::open_existing(&schema.url).unwrap().is_none());
    let mut client = postgres::Client::connect(&schema.url, postgres::NoTls).unwrap();
    let tables = |client: &mut postgres::Client| -> i64 {
        client
            .query_one(
                "SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema()",
                &[],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(tables(&mut client), 0, "open_existing created nothing");
    PostgresQueue::open(&schema.url).unwrap();
    client
        .batch_execute("UPDATE lazarus_queue_schema SET version = 99")
        .unwrap();
    let err = PostgresQueue::open(&schema.url).unwrap_err();
    assert!(
        matches!(
            err,
            QueueError::NewerSchema {
                found: 99,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade lazarus"), "{err}");
    let version: i32 = client
        .query_one("SELECT version FROM lazarus_queue_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, 99, "left untouched");
}
